"""Random-weight models of a known architecture, saved in the standard Hugging Face layout.

Memory does not depend on what the weights are, only on their shapes and dtypes, so the
measured comparison (``engine.memory.measure``) and the memory benches train models built
here: the config of a catalog architecture (``presets/models/``), weights drawn by
transformers' own initialisation, and a small byte-level BPE tokenizer with a chat
template. The folder loads through ``from_pretrained`` like any other model folder, so
the training worker treats it exactly as a downloaded base.

torch, transformers and tokenizers are imported inside the functions.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

# ChatML with generation markers (TRL's assistant-only loss): the demo's own, one definition.
from engine.demo import CHAT_TEMPLATE, SPECIAL_TOKENS
from engine.memory.arch import ModelArch

# Bump when the recipe below changes: cached folders carry this in their marker and are rebuilt.
RANDOM_MODEL_VERSION = "1"
TOKENIZER_VOCAB = 2048
MARKER = "lora_lab_random.json"


def hf_config(arch: ModelArch, attn: str = "sdpa", **overrides):
    """A transformers config object for ``arch`` (random weights are built from it)."""
    from transformers import AutoConfig

    config = {k: v for k, v in arch.config.items()
              if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    config.update(overrides)
    model_type = config.pop("model_type", arch.model_type)
    cfg = AutoConfig.for_model(model_type, **config)
    impl = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}[attn]
    if attn == "sdpa" and arch.attn_logit_softcapping:
        impl = "eager"
    cfg._attn_implementation = impl
    cfg.use_cache = False
    return cfg


def save_random_model(arch: ModelArch, folder: Path, dtype_name: str = "bfloat16", device: str = "cpu", seed: int = 0,
                      tokenizer_texts: list[str] | None = None) -> Path:
    """Write a randomly initialised checkpoint of ``arch`` to ``folder`` (reused when it is already there).

    With ``tokenizer_texts`` a tokenizer trained on them is saved beside the weights and the
    config's special token ids point at it; its vocabulary must fit the model's.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    wanted = {"arch": arch.name, "dtype": dtype_name, "seed": seed, "version": RANDOM_MODEL_VERSION,
              "tokenizer": tokenizer_texts is not None}
    marker = folder / MARKER
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k in wanted} == wanted:
        return folder
    started = time.time()
    overrides, tokenizer = {}, None
    if tokenizer_texts is not None:
        tokenizer = train_tokenizer(tokenizer_texts, min(TOKENIZER_VOCAB, arch.vocab_size))
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        overrides = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=dtype)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({**wanted, "parameters": parameters,
                                               "build_seconds": round(time.time() - started, 1)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def train_tokenizer(texts: list[str], vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE trained on ``texts``: any text still tokenizes (no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_models_dir() -> Path:
    """Versioned cache folder, beside the demo model (``$LORALAB_CACHE`` or ``.cache``)."""
    from engine.demo import cache_root

    return cache_root() / f"random-models-v{RANDOM_MODEL_VERSION}"


def demo_texts() -> list[str]:
    """The texts the tokenizer is trained on: the demo dataset's messages (the data measurements train on)."""
    from engine.data.load import load_dataset_rows

    rows = load_dataset_rows("demo").rows
    return [message["content"] for row in rows for message in row["messages"]] + SPECIAL_TOKENS


def ensure_random_model(arch: ModelArch, log=print) -> Path:
    """The cached random-weight model of ``arch`` (bf16 weights, demo-data tokenizer), built once.

    A file lock keeps two processes (a test and the dashboard, say) from building the same folder at once.
    """
    folder = random_models_dir() / arch.name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{arch.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = folder / MARKER
        if not marker.exists():
            log(f"building a random-weight {arch.name} ({arch.total_params / 1e6:.0f} M parameters) in {folder} (once)")
        return save_random_model(arch, folder, tokenizer_texts=demo_texts())


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.memory.random_model CATALOG_ID``: build (once) and print the folder.

    The measured comparison runs this in its own process, so the weights never sit in the dashboard's memory.
    """
    import sys

    from engine.errors import LoraLabError
    from engine.memory.arch import catalog_id_for

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or catalog_id_for(argv[0]) is None:
        print("usage: python -m engine.memory.random_model CATALOG_ID (an architecture in presets/models/)",
              file=sys.stderr)
        return 2
    from engine.memory.arch import load_arch

    try:
        folder = ensure_random_model(load_arch(catalog_id_for(argv[0])), log=lambda text: print(text, file=sys.stderr))
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
