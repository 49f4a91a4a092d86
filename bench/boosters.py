"""Padded vs padding-free vs packed batches: the same training on rows of realistic, long-tailed lengths.

Real instruction data is mostly short with a long tail (a few rows many times the median),
so a padded batch spends most of its compute on padding whenever one long row is in it.
This bench generates such a dataset from the demo world (short questions, medium
descriptions and JSON extractions, and a tail of multi-sentence "Repeat:" rows), then trains
the demo model through the real worker three ways, alternated, several runs each:

* padded: TRL's default collator (each batch padded to its longest row);
* padding-free: ``train.padding_free=true`` (rows flattened into one sequence per batch);
* packed: ``train.packing=true`` with TRL's best-fit-decreasing strategy (padding-free too),
  with the batch size chosen so a step sees about as many tokens as a padded step.

Every contender trains one epoch over the same rows (the same non-padding tokens), then
evaluates the same held-out rows. It prints non-padding tokens per second (the dataset's
tokens over ``train_runtime``), peak memory (the worker process's peak RSS: this is the
CPU), the final eval loss, and the ratios to padded. Targets on the CPU: padding-free or
packed >= 1.3x padded tokens/s at equal or lower peak memory, eval loss within 2%.

    python bench/boosters.py [--runs 3] [--rows 480] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- the dataset
def varied_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows whose token counts spread like instruction data: many short, a long tail.

    60% are one-sentence questions or extractions (~30-90 tokens), 30% restate two to four
    sentences, 10% are a tail of five to twelve sentences (up to ~250 tokens with the demo
    tokenizer). The vocabulary is the demo world's, so the demo model has seen every word.
    """
    from engine.demo import _general_example, _random_scene, _sentence, json_extraction_example

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.6:
            messages = _general_example(rng) if rng.random() < 0.5 else json_extraction_example(_random_scene(rng))
        else:
            count = rng.randint(2, 4) if draw < 0.9 else rng.randint(5, 12)
            sentences = " ".join(_sentence(_random_scene(rng)) for _ in range(count))
            messages = [{"role": "user", "content": f"Repeat: {sentences}"},
                        {"role": "assistant", "content": sentences}]
        rows.append({"messages": messages})
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- one run
CONTENDERS = {
    "padded": [],
    "padding-free": ["train.padding_free=true"],
    "packed": ["train.packing=true", "train.packing_strategy=bfd"],
}


def run_once(name: str, overrides: list[str], train_file: Path, eval_file: Path, scratch: Path) -> dict:
    """Train one epoch through the worker process; tokens/s, peak RSS and the final eval loss."""
    from engine.config import load_preset
    from engine.training import rundir

    config = load_preset("demo-lora", [
        f"data.path={train_file}", f"data.eval_path={eval_file}", "data.format=messages", "train.max_steps=-1",
        "train.num_train_epochs=1", "train.eval_steps=100000", "train.save_steps=100000", "train.logging_steps=5",
        "train.max_length=256", "train.warmup_steps=0.05", "train.per_device_eval_batch_size=16", *overrides])
    run_dir = rundir.create_run(scratch, config.validate())
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "engine.training.worker", str(run_dir)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, code, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB on Linux)
    process.returncode = os.waitstatus_to_exitcode(code)
    wall = time.perf_counter() - started
    status = rundir.read_status(run_dir)
    if process.returncode != 0 or status.get("state") != "completed":
        raise SystemExit(f"{name} failed: {status.get('error')}\n{rundir.log_tail(run_dir, 30)}")
    evals = [m for m in rundir.read_metrics(run_dir) if m.get("eval_loss") is not None]
    # train_runtime includes the base model's evaluation (eval_on_start); the final one runs after it.
    start_eval = sum(m.get("eval_runtime_s") or 0 for m in evals if m["step"] == 0)
    return {"runtime_s": status["train_runtime_s"] - start_eval, "wall_s": wall, "steps": status["step"],
            "eval_loss": evals[-1]["eval_loss"], "peak_rss_mib": usage.ru_maxrss / 1024}


def row_lengths(rows: list[dict], max_length: int) -> list[int]:
    """Each row's chat-template tokens with the demo tokenizer, truncated at max_length as TRL truncates."""
    from transformers import AutoTokenizer

    from engine.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(log=lambda *_: None))
    return [min(max_length, len(tokenizer.apply_chat_template(row["messages"], tokenize=True,
                                                              return_dict=True)["input_ids"])) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender, alternated")
    parser.add_argument("--rows", type=int, default=480, help="training rows")
    parser.add_argument("--batch", type=int, default=16, help="rows per padded / padding-free batch")
    args = parser.parse_args(argv)

    from engine.demo import ensure_demo_model

    ensure_demo_model(log=lambda *_: None)
    scratch = Path(tempfile.mkdtemp(prefix="loralab-boosters-"))
    train_rows, eval_rows = varied_rows(args.rows, seed=1), varied_rows(96, seed=2)
    train_file = write_rows(train_rows, scratch / "train.jsonl")
    eval_file = write_rows(eval_rows, scratch / "eval.jsonl")
    lengths = sorted(row_lengths(train_rows, 256))
    tokens = sum(lengths)
    mean = tokens / len(train_rows)
    # Packed rows are about max_length long: as many of them per step as a padded step has tokens.
    packed_batch = max(1, round(args.batch * mean / 256))
    print(f"dataset: {len(train_rows)} rows, {tokens} tokens; length median {lengths[len(lengths) // 2]}, "
          f"mean {mean:.0f}, p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")
    print(f"batch: {args.batch} rows (padded, padding-free), {packed_batch} packed rows of <= 256 tokens")
    batch_of = {"packed": packed_batch}
    contenders = {name: [*extra, f"train.per_device_train_batch_size={batch_of.get(name, args.batch)}"]
                  for name, extra in CONTENDERS.items()}
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for index in range(args.runs):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            result = run_once(name, contenders[name], train_file, eval_file, scratch)
            result["tokens_per_s"] = tokens / result["runtime_s"]
            results[name].append(result)
            print(f"run {index + 1} {name:>12}: {result['tokens_per_s']:8.0f} tok/s, {result['steps']:3d} steps, "
                  f"eval loss {result['eval_loss']:.4f}, peak RSS {_fmt(result['peak_rss_mib'])}", flush=True)

    print(f"\n{'contender':>12} {'tok/s (median)':>15} {'x padded':>9} {'peak RSS MiB':>13} {'x padded':>9} "
          f"{'eval loss':>10} {'diff':>7}")
    base = _summary(results["padded"])
    for name in contenders:
        row = _summary(results[name])
        print(f"{name:>12} {row['tokens_per_s']:15.0f} {row['tokens_per_s'] / base['tokens_per_s']:9.2f} "
              f"{_fmt(row['peak'])} {_ratio(row['peak'], base['peak'])} {row['eval_loss']:10.4f} "
              f"{100 * (row['eval_loss'] / base['eval_loss'] - 1):+6.2f}%")
    print("(peak RSS is the worker process's, tokens/s the dataset's non-padding tokens over train_runtime; "
          "the machine is shared, so single runs are noisy: compare medians)")
    return 0


def _summary(runs: list[dict]) -> dict:
    peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"]]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak": max(peaks) if peaks else None, "eval_loss": statistics.median(r["eval_loss"] for r in runs)}


def _fmt(mib) -> str:
    return f"{mib:13.0f}" if mib else f"{'?':>13}"


def _ratio(a, b) -> str:
    return f"{a / b:9.2f}" if a and b else f"{'?':>9}"


if __name__ == "__main__":
    raise SystemExit(main())
