"""Side-by-side chat memory: one base with its adapter on/off, against chatting with the base alone.

Each measurement runs in a fresh process, so peaks do not leak between them:

- ``base``: the base model alone (``AutoModelForCausalLM``), greedy generation;
- ``side-by-side``: ``engine.chat.models.ChatModels`` (the Chat tab's path): the base wrapped in
  PEFT with the adapter unmerged, generating once with the adapter off and once on;
- ``two-copies``: what side by side would cost without PEFT's switch (the base plus a
  merged copy), for contrast.

Memory is the peak of the process: ``torch.cuda.max_memory_allocated`` on CUDA, else the
peak resident set (``ru_maxrss``); on the CPU the "model" figure also subtracts the
resident set measured after the imports, i.e. what loading and generating added.
Tokens per second count a fixed number of new tokens per side (``min_new_tokens`` =
``max_new_tokens``), fastest of three runs (the one least disturbed by other
processes). Target: side-by-side peak <= 1.15 x base-alone peak.

Two models: the offline demo model with a LoRA adapter, and a larger random-weight Llama
config (about 170 M parameters) with a random LoRA adapter (r=16 on all linear layers).

    python bench/chat_memory.py [--tokens 32] [--models demo,large] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Extract as JSON: the big red apple is on the table."}]
LARGE_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                    tie_word_embeddings=True)
MODES = ("base", "side-by-side", "two-copies")


# ----------------------------------------------------------------------------- fixtures: base + adapter folders
def make_adapter(base_dir: Path, target: Path, seed: int = 0) -> Path:
    """A random (non-zero) LoRA adapter on all linear layers, so the 'on' side really computes it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.config import RunConfig
    from engine.config.build import to_lora_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = to_lora_config(RunConfig())  # r=16, alpha=32, all-linear
    lora.init_lora_weights = False  # random B as well as A: the adapter changes every output
    peft = get_peft_model(model, lora)
    peft.save_pretrained(target)
    return target


def make_large_base(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())  # ids < 2048 fit the larger vocabulary
    torch.manual_seed(0)
    config = LlamaConfig(**LARGE_CONFIG, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# ----------------------------------------------------------------------------- one measurement (child process)
def _peak(baseline_rss: int) -> dict:
    import torch

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"peak_rss": peak_rss, "baseline_rss": baseline_rss, "model_peak": peak_rss - baseline_rss,
              "source": "process peak resident set"}
    if torch.cuda.is_available():
        result.update(model_peak=torch.cuda.max_memory_allocated(), source="torch.cuda.max_memory_allocated")
    return result


def best_rate(generate, tokens: int, repeats: int) -> float:
    """Tokens per second of the fastest of ``repeats`` runs: the least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - started)
    return tokens / best


def _timed_generate(model, tokenizer, tokens: int, repeats: int = 1) -> float:
    import torch

    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    encoded = {k: v.to(model.device) for k, v in encoded.items()}

    def generate():
        with torch.inference_mode():
            output = model.generate(**encoded, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        assert output.shape[1] - encoded["input_ids"].shape[1] == tokens

    return best_rate(generate, tokens, repeats)


def child(mode: str, base_dir: str, adapter_dir: str, tokens: int, repeats: int = 3) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import engine.chat.models as chat

    baseline_rss = psutil.Process().memory_info().rss
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    result = {"mode": mode}
    if mode == "base":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
        _timed_generate(model, tokenizer, 4)  # warm-up
        result["tokens_per_s"] = {"base": _timed_generate(model, tokenizer, tokens, repeats)}
    elif mode == "two-copies":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device),
                                          adapter_dir).merge_and_unload().eval()
        _timed_generate(base, tokenizer, 4)
        result["tokens_per_s"] = {"base": _timed_generate(base, tokenizer, tokens, repeats),
                                  "finetuned": _timed_generate(tuned, tokenizer, tokens, repeats)}
    else:
        models = chat.ChatModels()
        source = chat.AdapterSource(path=Path(adapter_dir), label="bench", base_model=base_dir)
        models.load(source)
        sampling = chat.Sampling(greedy=True, max_new_tokens=tokens, min_new_tokens=tokens)
        models.answer(PROMPT, chat.BASE, chat.Sampling(greedy=True, max_new_tokens=4))  # warm-up
        speeds = {side: best_rate(lambda side=side: models.answer(PROMPT, side, sampling), tokens, repeats)
                  for side in chat.SIDES}  # exactly ``tokens`` new tokens per answer (min = max)
        # And one streamed side-by-side turn, exactly as the tab runs it.
        for _ in models.stream_pair(PROMPT, PROMPT, sampling):
            pass
        result["tokens_per_s"] = speeds
        result["base_loads"] = models.base_loads
    result.update(_peak(baseline_rss))
    return result


# ----------------------------------------------------------------------------- driver
def measure(mode: str, base_dir: Path, adapter_dir: Path, tokens: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.run([sys.executable, __file__, "--child", mode, str(base_dir), str(adapter_dir),
                              str(tokens)], cwd=ROOT, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"{mode} measurement failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per side")
    parser.add_argument("--models", default="demo,large", help="demo, large, or both (comma separated)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, base_dir, adapter_dir, tokens = args.child
        print(json.dumps(child(mode, base_dir, adapter_dir, int(tokens))))
        return 0

    from engine.demo import ensure_demo_model

    report = {}
    with tempfile.TemporaryDirectory(prefix="chat-memory-") as scratch:
        scratch = Path(scratch)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            base_dir = ensure_demo_model() if name == "demo" else make_large_base(scratch / "large-base")
            adapter_dir = make_adapter(base_dir, scratch / f"{name}-adapter")
            results = {mode: measure(mode, base_dir, adapter_dir, args.tokens) for mode in MODES}
            base, pair = results["base"], results["side-by-side"]
            report[name] = {
                "results": results,
                "ratio_peak": pair["peak_rss"] / base["peak_rss"],
                "ratio_model_peak": pair["model_peak"] / base["model_peak"],
                "ratio_two_copies_model_peak": results["two-copies"]["model_peak"] / base["model_peak"],
            }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, entry in report.items():
        results = entry["results"]
        print(f"== {name} model ({results['base']['source']}) ==")
        for mode in MODES:
            r = results[mode]
            speeds = ", ".join(f"{side} {value:.1f} tok/s" for side, value in r["tokens_per_s"].items())
            print(f"  {mode:<13} peak {mib(r['peak_rss'])} (after imports {mib(r['baseline_rss'])}; added by "
                  f"the model {mib(r['model_peak'])}); {speeds}")
        print(f"  side-by-side / base alone, whole-process peak: {entry['ratio_peak']:.3f}x")
        print(f"  side-by-side / base alone, model-added peak:   {entry['ratio_model_peak']:.3f}x (target <= 1.15x)")
        print(f"  two copies  / base alone, model-added peak:   {entry['ratio_two_copies_model_peak']:.3f}x")
        pair = results["side-by-side"]["tokens_per_s"]
        print(f"  fine-tuned side speed / base side speed (adapter unmerged): "
              f"{pair['finetuned'] / pair['base']:.2f}x; base loads in the side-by-side process: "
              f"{results['side-by-side']['base_loads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
