"""The offline demo: a tiny Llama-architecture base model, its tokenizer and a dataset.

Nothing here downloads anything. The base model is *pretrained here* for about a minute
on a synthetic corpus of simple instructions about a tiny world of objects ("Describe:",
"Repeat:", "List the facts:", "Quote the words:", ...), so it follows the chat template and can
read a sentence and restate it. The demo dataset then teaches it a skill it has never
seen: extracting the sentence into a JSON object ("Extract as JSON:"). That is what
LoRA is for in practice (a new output format on top of general ability), and it makes a
large, measurable drop in held-out loss that a person can also see in the Chat tab.

Everything is derived from ``DEMO_SEED``: the corpus, the tokenizer (byte-level BPE
trained on the corpus) and the initial weights. The model is cached under
``.cache/demo-model`` (or ``$LORALAB_CACHE``) in the standard Hugging Face layout, so it
loads through exactly the same ``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from engine import IN_CHECKOUT, PRESETS_DIR, PROJECT_ROOT

DEMO_MODEL_NAME = "demo"
DEMO_SEED = 1234
DEMO_DATA_DIR = PRESETS_DIR / "data"
BUILD_VERSION = "3"  # bump when the recipe below changes, so caches rebuild

SIZES = ["big", "small", "tiny", "huge", "long", "short"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "gray"]
OBJECTS = [
    "apple", "ball", "book", "box", "cat", "chair", "cup", "dog", "door", "egg", "fish", "flower",
    "hat", "key", "lamp", "leaf", "letter", "map", "mouse", "pen", "phone", "plate", "rock", "rope",
    "shoe", "sock", "spoon", "star", "stone", "table", "toy", "tree", "truck", "vase", "watch",
    "wheel", "bird", "bottle", "coin", "drum",
]
RELATIONS = ["on", "under", "near", "behind", "inside"]
PLACES = [
    "bed", "bench", "box", "car", "chair", "desk", "floor", "garden", "house", "kitchen", "road",
    "roof", "room", "school", "shelf", "sofa", "table", "tent", "wall", "window",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Architecture: small enough to pretrain in about a minute on 2 CPU cores, with GQA so
# the memory calculator's grouped-query path is exercised by the demo too.
MODEL_DIMENSIONS = dict(
    vocab_size=2048,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 24
PRETRAIN_LR = 2e-3


# ----------------------------------------------------------------------------- the world
def _random_scene(rng: random.Random) -> dict:
    return {
        "object": rng.choice(OBJECTS),
        "size": rng.choice(SIZES),
        "color": rng.choice(COLORS),
        "relation": rng.choice(RELATIONS),
        "place": rng.choice(PLACES),
    }


def _sentence(scene: dict) -> str:
    return f"the {scene['size']} {scene['color']} {scene['object']} is {scene['relation']} the {scene['place']}."


def _general_example(rng: random.Random) -> list[dict]:
    """One instruction of the kind the base model is pretrained on."""
    scene = _random_scene(rng)
    sentence = _sentence(scene)
    kind = rng.randrange(6)
    if kind == 0:
        prompt = f"Describe: {sentence}"
        answer = (
            f"The {scene['object']} is {scene['size']} and {scene['color']}. "
            f"It is {scene['relation']} the {scene['place']}."
        )
    elif kind == 1:
        prompt, answer = f"Repeat: {sentence}", sentence
    elif kind == 2:
        prompt, answer = f"What color is it? {sentence}", f"It is {scene['color']}."
    elif kind == 3:
        prompt, answer = f"Where is it? {sentence}", f"It is {scene['relation']} the {scene['place']}."
    elif kind == 4:
        # Key names and "key: value" lists: the vocabulary the JSON task later reuses.
        prompt = f"List the facts: {sentence}"
        answer = ", ".join(f"{key}: {scene[key]}" for key in ("object", "size", "color", "relation", "place"))
    else:
        # Quotes and braces, so those tokens have trained embeddings before fine-tuning.
        prompt = f"Quote the words: {sentence}"
        answer = "{" + ", ".join(f'"{word}"' for word in sentence.rstrip(".").split()) + "}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def json_extraction_example(scene: dict) -> list[dict]:
    """The fine-tuning task: the same sentence, answered as a JSON object."""
    answer = json.dumps(
        {k: scene[k] for k in ("object", "size", "color", "relation", "place")}, separators=(", ", ": ")
    )
    return [
        {"role": "user", "content": f"Extract as JSON: {_sentence(scene)}"},
        {"role": "assistant", "content": answer},
    ]


def build_demo_dataset_rows(seed: int = DEMO_SEED, n_train: int = 1200, n_eval: int = 200):
    """Train and held-out rows; no eval sentence appears in train."""
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        scene = _random_scene(rng)
        key = _sentence(scene)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": json_extraction_example(scene)})
    return rows[:n_train], rows[n_train:]


def write_demo_dataset(directory: Path = DEMO_DATA_DIR) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = build_demo_dataset_rows()
    paths = directory / "demo_train.jsonl", directory / "demo_eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def demo_dataset_path(split: str = "train") -> Path:
    """The bundled demo JSONL (committed; regenerated by ``write_demo_dataset``)."""
    return DEMO_DATA_DIR / ("demo_eval.jsonl" if split == "eval" else "demo_train.jsonl")


# ----------------------------------------------------------------------------- building
def cache_root() -> Path:
    default = PROJECT_ROOT / ".cache" if IN_CHECKOUT else Path.home() / ".cache" / "loralab"
    return Path(os.environ.get("LORALAB_CACHE", default))


def demo_model_dir() -> Path:
    return cache_root() / "demo-model"


def _pretraining_conversations(seed: int, count: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [_general_example(rng) for _ in range(count)]


def _train_tokenizer(texts: list[str]):
    """Byte-level BPE trained on the corpus: any input text still tokenizes (no UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_DIMENSIONS["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=MODEL_DIMENSIONS["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_demo_model(target: Path, seed: int = DEMO_SEED, log=print) -> Path:
    """Build tokenizer and pretrained tiny Llama into ``target`` (atomically)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    conversations = _pretraining_conversations(seed, PRETRAIN_STEPS * PRETRAIN_BATCH)
    tokenizer = _train_tokenizer([m["content"] for conv in conversations for m in conv] + SPECIAL_TOKENS)
    # Loss on the assistant turns only: the scene words in the prompts are random by
    # construction, and spending capacity on predicting them slows learning to copy them.
    encoded = [
        tokenizer.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
        for conv in conversations
    ]
    torch.manual_seed(seed)
    config = LlamaConfig(
        **MODEL_DIMENSIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=PRETRAIN_LR, total_steps=PRETRAIN_STEPS, pct_start=0.05
    )
    # A hand-written loop rather than Trainer: this is building the base, not the
    # product's training path, and a 30-line loop keeps the build fast and obvious.
    for step in range(PRETRAIN_STEPS):
        batch = encoded[step * PRETRAIN_BATCH : (step + 1) * PRETRAIN_BATCH]
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids = torch.tensor(item["input_ids"])
            trained = torch.tensor(item["assistant_masks"]) == 1
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = torch.where(trained, ids, -100)
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == PRETRAIN_STEPS - 1:
            log(f"demo base model: pretraining step {step + 1}/{PRETRAIN_STEPS}, loss {loss.item():.3f}")

    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "loralab_demo.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "build_version": BUILD_VERSION,
                "pretrain_steps": PRETRAIN_STEPS,
                "final_pretrain_loss": round(loss.item(), 4),
                "build_seconds": round(time.time() - started, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log(f"demo base model built in {time.time() - started:.0f} s at {target}")
    return target


def ensure_demo_model(log=print) -> Path:
    """The demo model folder, built once and cached (a file lock guards parallel builds)."""
    import fcntl

    target = demo_model_dir()
    marker = target / "loralab_demo.json"
    if marker.exists() and json.loads(marker.read_text()).get("build_version") == BUILD_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "demo-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and json.loads(marker.read_text()).get("build_version") == BUILD_VERSION:
            return target
        log("building the offline demo base model (once, about a minute)...")
        return build_demo_model(target, log=log)


if __name__ == "__main__":
    write_demo_dataset()
    ensure_demo_model()


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m engine demo``: build the demo model once (cached) and print its folder."""
    import argparse

    argparse.ArgumentParser(prog="python -m engine demo", description="Build the offline demo model once (about a "
                            f"minute and a half on 2 cores) and cache it in {demo_model_dir()} (LORALAB_CACHE moves "
                            "it); prints its folder.").parse_args(argv)
    print(ensure_demo_model())
    return 0
