"""What only a GPU can show, in one table (run through ``bench/gpu_check.sh``, at most 8 minutes).

On a 1B-class Llama with random weights (``llama-3.2-1b`` from the catalog), each row is one
configuration trained for a few optimizer steps in its own process (so no allocator cache,
CUDA context or paged state leaks into the next), the way LoRA Lab trains (bench/memory_harness:
the worker's LoraConfig / BitsAndBytesConfig, prepare_model_for_kbit_training, TRL's fused LM
head, the optimizer transformers' Trainer builds). Columns:

* torch peak: ``torch.cuda.max_memory_allocated`` over the steps; predicted: the calculator's
  ``peak_allocated_bytes`` for the same settings, and the error;
* NVML peak: the GPU's used memory above what was used before the process started, polled
  every 10 ms; predicted: the calculator's ``nvidia_smi_bytes``;
* sampler: the peak of LoRA Lab's own ``GpuSampler`` (engine.training.sampler) watching the
  process on this real device (NVML per-process accounting), next to the NVML peak;
* tokens/s: non-padding tokens per second over the timed steps (after one warm-up step).

Sections: QLoRA vs LoRA; the calculator against the peaks on more configurations (method,
sequence length, checkpointing, batch); a paged optimizer (its states live outside torch's
allocator, so NVML sees them and torch does not); and each booster on and off on rows of
long-tailed lengths (padded, padding-free, bfd-packed, FlashAttention 2, Liger kernels).

    python bench/gpu_check.py --dry-run      # the plan and the calculator's predictions, no GPU needed
    python bench/gpu_check.py --smoke        # the whole pipeline on the CPU with a tiny model (tests)
    bash bench/gpu_check.sh                  # on a GPU: the table
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.memory.arch import arch_from_config, load_arch  # noqa: E402
from engine.memory.estimator import GiB, MemorySettings, estimate  # noqa: E402

MODEL = "llama-3.2-1b"
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- the plan
def plan(smoke: bool = False) -> list[dict]:
    """Every row of the table: a section, a label, the model and its MemorySettings (as a dict)."""
    def row(section, label, data="fixed", **settings):
        base = dict(method="qlora", batch_size=2, seq_len=2048, gradient_checkpointing=True,
                    optimizer="adamw_torch_fused", compute_dtype="bfloat16")
        return {"section": section, "label": label, "data": data,
                "settings": asdict(MemorySettings(**{**base, **settings}))}

    if smoke:  # the same code path on the CPU, small enough for a test
        tiny = dict(seq_len=64, compute_dtype="float32", optimizer="adamw_torch", device="cpu")
        return [row("method", "LoRA", method="lora", **tiny),
                row("boosters", "padding-free", data="varied", padding_free=True, **{**tiny, "batch_size": 4})]
    rows = [
        row("method", "LoRA, 2048 x 2, ckpt on", method="lora"),
        row("method", "QLoRA, 2048 x 2, ckpt on", method="qlora"),
        row("calculator", "QLoRA, 512 x 4, ckpt off", seq_len=512, batch_size=4, gradient_checkpointing=False),
        row("calculator", "LoRA, 1024 x 2, ckpt off", method="lora", seq_len=1024, gradient_checkpointing=False),
        row("calculator", "QLoRA, 4096 x 1, ckpt on", seq_len=4096, batch_size=1),
        row("calculator", "full, 1024 x 1, ckpt on", method="full", seq_len=1024, batch_size=1),
        row("paged optimizer", "QLoRA + paged_adamw_32bit", optimizer="paged_adamw_32bit"),
    ]
    booster = dict(batch_size=4, seq_len=2048, data="varied")
    rows += [
        row("boosters", "padded (sdpa)", padded=True, **booster),
        row("boosters", "padding-free (sdpa)", padding_free=True, **booster),
        row("boosters", "packed bfd (sdpa)", padding_free=True, **{**booster, "data": "packed"}),
        row("boosters", "padding-free + flash_attention_2", padding_free=True, attn="flash", **booster),
        row("boosters", "padded + Liger kernels", padded=True, liger=True, **booster),
    ]
    return rows


def arch_for(smoke: bool):
    return arch_from_config(TINY, name="tiny-llama") if smoke else load_arch(MODEL)


def prediction(arch, spec: dict, shapes: list[list[int]] | None = None):
    """The calculator's estimate; for rows of varied lengths, of the widest batch actually run."""
    settings = MemorySettings(**spec["settings"])
    if spec["data"] == "fixed" or not shapes:
        return estimate(arch, settings)
    best = None
    for batch, length in shapes:
        shaped = replace(settings, batch_size=batch, seq_len=max(2, length))
        if settings.padding_free:  # one row of all the batch's tokens
            shaped = replace(shaped, batch_size=1)
        candidate = estimate(arch, shaped)
        if best is None or candidate.peak_allocated_bytes > best.peak_allocated_bytes:
            best = candidate
    return best


def missing_for(spec: dict) -> str | None:
    """Why a row cannot run on this machine (a package it needs), or None."""
    import importlib.util

    settings = spec["settings"]
    if settings["attn"] == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if settings["liger"] and settings["device"] == "cuda" and not (
            importlib.util.find_spec("liger_kernel") and importlib.util.find_spec("triton")):
        return "liger-kernel (and triton) are not installed"
    return None


# ----------------------------------------------------------------------------- one measurement (child)
def varied_lengths(count: int, max_len: int, seed: int) -> list[int]:
    """Long-tailed row lengths like instruction data: 60% short, 30% medium, 10% up to max_len."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        draw = rng.random()
        share = rng.uniform(0.03, 0.15) if draw < 0.6 else rng.uniform(0.15, 0.45) if draw < 0.9 else \
            rng.uniform(0.45, 1.0)
        out.append(max(8, int(share * max_len)))
    return out


def make_batches(arch, settings: MemorySettings, data: str, steps: int, device: str) -> list[dict]:
    """``steps`` batches: fixed (the harness's), or varied rows through TRL's collators (and bfd packing)."""
    import torch

    from bench.memory_harness import make_batch

    if data == "fixed":
        return [make_batch(arch, settings, device=device, seed=i) for i in range(steps)]
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(0)
    lengths = varied_lengths(settings.batch_size * steps * 2, settings.seq_len, seed=1)
    rows = [{"input_ids": torch.randint(1, arch.vocab_size, (n,), generator=generator).tolist()} for n in lengths]
    per_batch = settings.batch_size
    if data == "packed":
        from datasets import Dataset
        from trl.data_utils import pack_dataset

        packed = pack_dataset(Dataset.from_list([{**r, "labels": r["input_ids"]} for r in rows]), settings.seq_len,
                              "bfd")
        rows = [{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]} for r in packed]
        # As many packed rows per step as a padded step has tokens, at least one.
        per_batch = max(1, round(settings.batch_size * statistics.mean(lengths) / settings.seq_len))
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=settings.padding_free)
    batches = []
    for index in range(steps):
        chunk = rows[index * per_batch:(index + 1) * per_batch] or rows[:per_batch]
        batch = collator(chunk)
        batches.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
    return batches


def measure_one(spec: dict, cache_dir: Path, steps: int, smoke: bool) -> dict:
    """Build the model, train ``steps`` steps (the first a warm-up), return peaks, speed and shapes."""
    from bench.memory_accuracy import NvmlPeak
    from engine.training.sampler import GpuSampler

    settings = MemorySettings(**spec["settings"])
    device = settings.device
    nvml = None
    if device == "cuda":
        try:
            nvml = NvmlPeak()  # before CUDA starts: the baseline is everything else on the GPU
        except Exception as exc:  # noqa: BLE001 - report the torch side alone
            print(f"NVML unavailable ({exc})", file=sys.stderr)
    sampler = GpuSampler(interval_s=0.05, run_dir=Path(tempfile.mkdtemp(prefix="loralab-gpu-check-")), pid=os.getpid())
    import torch

    from bench.memory_harness import apply_liger, build_model, forward_loss, make_optimizer

    arch = arch_for(smoke)
    liger = settings.liger
    model = build_model(arch, replace(settings, liger=False), device=device, checkpoint_dir=cache_dir / arch.name)
    liger_kind = apply_liger(model) if liger else None
    optimizer = make_optimizer(model, settings)
    batches = make_batches(arch, settings, spec["data"], steps, device)
    shapes = [[int(b["input_ids"].shape[0]), int(b["input_ids"].shape[1])] for b in batches]
    cuda = device == "cuda"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(settings.compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if nvml:
        nvml.start()
    sampler.start()
    timed_tokens, timed_s, losses = 0, 0.0, []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward_loss(model, batch, settings)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if index > 0:  # the first step is a warm-up (kernels, optimizer states)
            timed_s += time.perf_counter() - started
            # Non-padding tokens: the mask of a padded batch; a padding-free batch has no padding at all.
            timed_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
                int(batch["input_ids"].numel())
    time.sleep(0.15)  # one more sampler tick at the peak's level
    sampler.stop()
    if nvml:
        nvml.stop()
    samples = sampler.recent(3600)
    sampled = [s.get("process_bytes") for s in samples if s.get("process_bytes") is not None]
    return {
        "torch_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "nvml_peak": (nvml.peak - nvml.baseline) if nvml else None,
        "sampler_peak": max(sampled) if sampled else None,
        "sampler_source": samples[-1]["source"] if samples else None,
        "sampler_samples": len(samples),
        "tokens_per_s": timed_tokens / timed_s if timed_s else None,
        "shapes": shapes,
        "losses": losses,
        "liger": liger_kind,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


# ----------------------------------------------------------------------------- the table (parent)
def run_child(spec: dict, args, timeout: float) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps(spec), "--cache-dir", args.cache_dir,
               "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-2:]
    return {"error": " | ".join(tail)[-300:] or f"exit code {done.returncode}"}


def _gib(value) -> str:
    return f"{value / GiB:7.2f}" if value else f"{'–':>7}"


def _err(predicted, measured) -> str:
    return f"{(predicted - measured) / measured:+6.1%}" if predicted and measured else f"{'':>6}"


HEADER = (f"{'section':<16} {'configuration':<34} {'torch':>7} {'pred':>7} {'err':>6} {'NVML':>7} {'pred':>7} "
          f"{'err':>6} {'sampler':>7} {'tok/s':>8}  note")


def format_row(spec: dict, result: dict, predicted) -> str:
    """One line of the table: peaks in GiB, predictions and errors, the sampler, speed, a note."""
    head = f"{spec['section']:<16} {spec['label']:<34}"
    if "error" in result or "skipped" in result:
        return f"{head} {result.get('skipped') or 'failed: ' + result['error']}"
    pred_alloc = predicted.peak_allocated_bytes if predicted else None
    pred_smi = predicted.nvidia_smi_bytes if predicted else None
    speed = f"{result['tokens_per_s']:8.0f}" if result.get("tokens_per_s") else f"{'–':>8}"
    notes = []
    if result.get("liger"):
        notes.append(f"Liger: {result['liger']}")
    if spec["settings"]["optimizer"].startswith("paged") and result.get("nvml_peak") and result.get("torch_peak"):
        notes.append(f"NVML - torch = {(result['nvml_peak'] - result['torch_peak']) / GiB:.2f} GiB "
                     f"(paged states {predicted.terms['optimizer_states_paged'] / GiB:.2f} predicted)")
    if spec["data"] != "fixed" and result.get("shapes"):
        widest = max(result["shapes"], key=lambda s: s[0] * s[1])
        notes.append(f"widest batch {widest[0]} x {widest[1]}")
    if result.get("sampler_source") and result["sampler_source"] != "nvml":
        notes.append(f"sampler: {result['sampler_source']}")
    return (f"{head} {_gib(result.get('torch_peak'))} {_gib(pred_alloc)} {_err(pred_alloc, result.get('torch_peak'))} "
            f"{_gib(result.get('nvml_peak'))} {_gib(pred_smi)} {_err(pred_smi, result.get('nvml_peak'))} "
            f"{_gib(result.get('sampler_peak'))} {speed}  {'; '.join(notes)}")


def summary_lines(rows: list[tuple[dict, dict, object]]) -> list[str]:
    """Worst calculator errors, the sampler against NVML, and each booster against padded."""
    done = [(spec, res, pred) for spec, res, pred in rows if "error" not in res and "skipped" not in res]
    lines = []
    errors = [abs((pred.peak_allocated_bytes - res["torch_peak"]) / res["torch_peak"])
              for spec, res, pred in done if res.get("torch_peak")]
    if errors:
        lines.append(f"calculator vs torch peak: {len(errors)} configurations, worst |error| {max(errors):.1%}, "
                     f"mean {statistics.mean(errors):.1%}")
    pairs = [(res["sampler_peak"], res["nvml_peak"]) for _, res, _ in done
             if res.get("sampler_peak") and res.get("nvml_peak")]
    if pairs:
        worst = max(abs(a - b) / b for a, b in pairs)
        lines.append(f"GpuSampler (NVML per-process) vs NVML device peak: worst difference {worst:.1%} "
                     f"over {len(pairs)} runs")
    boosters = {spec["label"]: res for spec, res, _ in done if spec["section"] == "boosters"}
    base = next((res for label, res in boosters.items() if label.startswith("padded (")), None)
    if base and base.get("tokens_per_s"):
        for label, res in boosters.items():
            if res is base or not res.get("tokens_per_s"):
                continue
            memory = f", torch peak {res['torch_peak'] / base['torch_peak']:.2f}x" if res.get("torch_peak") and \
                base.get("torch_peak") else ""
            lines.append(f"{label}: {res['tokens_per_s'] / base['tokens_per_s']:.2f}x padded tokens/s{memory}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the predictions; run nothing")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline on the CPU with a tiny model")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per row (the first is a warm-up)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="stop starting rows after this many seconds")
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "loralab-gpu-check"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), Path(args.cache_dir), args.steps, args.smoke)))
        return 0

    started = time.monotonic()
    specs = [s for s in plan(args.smoke) if not args.only or s["section"] in args.only.split(",")]
    arch = arch_for(args.smoke)
    print(f"{arch.name}, random weights; {args.steps} steps per row (first one a warm-up); peaks in GiB; "
          f"'pred' is the calculator's prediction")
    print(HEADER)
    rows = []
    for spec in specs:
        remaining = args.deadline_s - (time.monotonic() - started)
        why = missing_for(spec)
        if args.dry_run:
            result = {"skipped": "dry run: predicted torch "
                                 f"{prediction(arch, spec).peak_allocated_bytes / GiB:.2f} GiB, nvidia-smi "
                                 f"{prediction(arch, spec).nvidia_smi_bytes / GiB:.2f} GiB"
                                 + (f" (will skip: {why})" if why else "")}
        elif why:
            result = {"skipped": f"skipped: {why}"}
        elif remaining < 30:
            result = {"skipped": "skipped: the 8-minute budget is spent"}
        else:
            Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
            result = run_child(spec, args, timeout=min(remaining, 150.0))
        predicted = prediction(arch, spec, result.get("shapes"))
        rows.append((spec, result, predicted))
        print(format_row(spec, result, predicted), flush=True)
    if not args.dry_run:
        print()
        for line in summary_lines(rows):
            print(line)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
