"""Padded vs padding-free vs packed batches: the same training on rows of realistic, long-tailed lengths.

Real instruction data is mostly short with a long tail (a few rows many times the median),
so a padded batch spends most of its compute on padding whenever one long row is in it.
This bench generates such a dataset from the demo world (short questions, medium
descriptions and JSON extractions, and a tail of multi-sentence "Repeat:" rows), then trains
LoRA on the demo model several ways, alternated, several runs each:

* padded: TRL's default collator (each batch padded to its longest row);
* padding-free: ``train.padding_free=true`` (the batch's rows flattened into one sequence);
* packed: ``train.packing=true`` with TRL's best-fit-decreasing strategy (padding-free too),
  with as many packed rows per step as a padded step has tokens;
* padded and padding-free again with the 16 rows of a step split into 4 forward passes
  (gradient accumulation): with sdpa the flattened batch's block-diagonal mask makes
  attention quadratic in the batch's tokens, so shorter passes help padding-free most.

Every contender takes the same optimizer steps over the same rows (the same non-padding
tokens), each run in a fresh process built with the worker's own builders (engine.config.build,
engine.training.worker.build_datasets), then evaluates the same held-out rows (never packed).
It prints non-padding tokens per CPU-second and per wall-second, peak memory (the process's
peak RSS: this is the CPU), the final eval loss, and the ratios to padded. Targets on the CPU:
padding-free or packed >= 1.3x padded tokens/s at equal or lower peak memory, eval loss within 2%.

    python bench/boosters.py [--runs 2] [--rows 640] [--batch 16]
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
# name: (overrides, rows or packed rows per forward pass, forward passes per optimizer step). Every
# contender takes the same optimizer steps: 16 rows (or as many tokens, packed) per step.
def contenders(batch: int, packed_batch: int) -> dict[str, tuple[list[str], int, int]]:
    micro = max(1, batch // 4)
    return {
        "padded": ([], batch, 1),
        "padding-free": (["train.padding_free=true"], batch, 1),
        "packed": (["train.packing=true", "train.packing_strategy=bfd"], packed_batch, 1),
        f"padded {micro}x{batch // micro}": ([], micro, batch // micro),
        f"padding-free {micro}x{batch // micro}": (["train.padding_free=true"], micro, batch // micro),
    }


def train_once(overrides: list[str], train_file: str, eval_file: str, out: str) -> dict:
    """One epoch with the worker's own builders (engine.config.build), in this process; then the eval loss.

    The trainer is built exactly as the worker builds it (datasets through engine.data, the
    model through model_load_kwargs, SFTConfig through to_sft_config, the padding-free collator
    through to_data_collator) but without evaluations during training, so ``trainer.train()``
    times training alone. Wall time and this process's CPU time are both measured: on a shared
    machine the CPU time is what other people's jobs disturb least.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from engine.config import load_preset
    from engine.config.build import (
        decide_runtime,
        model_load_kwargs,
        to_data_collator,
        to_lora_config,
        to_sft_config,
    )
    from engine.demo import ensure_demo_model
    from engine.training.worker import build_datasets

    torch.set_num_threads(1)  # see main(): one thread, so CPU time is not inflated by threads spinning at barriers
    config = load_preset("demo-lora", [
        f"data.path={train_file}", f"data.eval_path={eval_file}", "data.format=messages", "train.max_steps=-1",
        "train.num_train_epochs=1", "train.max_length=256", "train.warmup_steps=0.05", "train.logging_steps=5",
        "train.per_device_eval_batch_size=16", *overrides]).validate()
    runtime = decide_runtime(config)
    model_dir = ensure_demo_model(log=lambda *_: None)
    train_dataset, eval_dataset, _ = build_datasets(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(config, runtime))
    args = to_sft_config(config, runtime, out, has_eval=False)
    args.save_strategy = "no"
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         peft_config=to_lora_config(config), data_collator=to_data_collator(config, runtime, tokenizer))
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    eval_loss = trainer.evaluate(eval_dataset)["eval_loss"]
    import resource

    return {"wall_s": wall, "cpu_s": cpu, "tokens": trainer.state.num_input_tokens_seen,
            "steps": trainer.state.global_step, "eval_loss": eval_loss,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def run_once(name: str, overrides: list[str], train_file: Path, eval_file: Path, scratch: Path) -> dict:
    """``train_once`` in a fresh process (its own peak RSS, no allocator state carried over)."""
    command = [sys.executable, __file__, "--one", json.dumps([overrides, str(train_file), str(eval_file),
                                                              str(scratch / "out")])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def row_lengths(rows: list[dict], max_length: int) -> list[int]:
    """Each row's chat-template tokens with the demo tokenizer, truncated at max_length as TRL truncates."""
    from transformers import AutoTokenizer

    from engine.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(log=lambda *_: None))
    return [min(max_length, len(tokenizer.apply_chat_template(row["messages"], tokenize=True,
                                                              return_dict=True)["input_ids"])) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each contender, alternated")
    parser.add_argument("--rows", type=int, default=640, help="training rows (16 per step: 40 steps)")
    parser.add_argument("--batch", type=int, default=16, help="rows per padded / padding-free batch")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one training run, printed as JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(train_once(*json.loads(args.one))))
        return 0

    from engine.demo import ensure_demo_model

    ensure_demo_model(log=lambda *_: None)
    scratch = Path(tempfile.mkdtemp(prefix="loralab-boosters-"))
    train_rows, eval_rows = varied_rows(args.rows, seed=1), varied_rows(96, seed=2)
    train_file = write_rows(train_rows, scratch / "train.jsonl")
    eval_file = write_rows(eval_rows, scratch / "eval.jsonl")
    lengths = sorted(row_lengths(train_rows, 256))
    mean = sum(lengths) / len(lengths)
    # Packed rows are about max_length long: as many of them per step as a padded step has tokens.
    packed_batch = max(1, round(args.batch * mean / 256))
    print(f"dataset: {len(train_rows)} rows, {sum(lengths)} tokens; length median {lengths[len(lengths) // 2]}, "
          f"mean {mean:.0f}, p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")
    print(f"per optimizer step: {args.batch} rows, or {packed_batch} packed rows of <= 256 tokens; one epoch each, "
          "sdpa attention, LoRA on the demo model; AxB = A rows per forward pass, B passes accumulated")
    runs = {name: [*overrides, f"train.per_device_train_batch_size={rows}",
                   f"train.gradient_accumulation_steps={accum}"]
            for name, (overrides, rows, accum) in contenders(args.batch, packed_batch).items()}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for index in range(args.runs):
        order = list(runs) if index % 2 == 0 else list(reversed(runs))
        for name in order:
            result = run_once(name, runs[name], train_file, eval_file, scratch)
            results[name].append(result)
            print(f"run {index + 1} {name:>18}: {result['tokens'] / result['cpu_s']:6.0f} tok/CPU-s, "
                  f"{result['tokens'] / result['wall_s']:6.0f} tok/s wall, {result['tokens']} tokens in "
                  f"{result['steps']} steps, eval loss {result['eval_loss']:.4f}, peak RSS "
                  f"{result['peak_rss_mib']:.0f} MiB", flush=True)

    print(f"\n{'contender':>18} {'tok/CPU-s':>10} {'x':>6} {'tok/s wall':>11} {'x':>6} {'peak RSS MiB':>13} {'x':>6} "
          f"{'eval loss':>10} {'diff':>7}   (medians of {args.runs} runs)")
    base = _summary(results["padded"])
    for name in runs:
        row = _summary(results[name])
        print(f"{name:>18} {row['cpu']:10.0f} {row['cpu'] / base['cpu']:6.2f} {row['wall']:11.0f} "
              f"{row['wall'] / base['wall']:6.2f} {row['peak']:13.0f} {row['peak'] / base['peak']:6.2f} "
              f"{row['eval_loss']:10.4f} {100 * (row['eval_loss'] / base['eval_loss'] - 1):+6.2f}%")
    print("Each run trains on one thread: tok/CPU-s (non-padding tokens over the training process's CPU time "
          "during trainer.train()) is then what other people's jobs on this shared machine disturb least; "
          "tok/s wall is the same over wall time. Peak RSS: the whole process, the largest over runs.")
    return 0


def _summary(runs: list[dict]) -> dict:
    return {"wall": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
            "cpu": statistics.median(r["tokens"] / r["cpu_s"] for r in runs),
            "peak": max(r["peak_rss_mib"] for r in runs),
            "eval_loss": statistics.median(r["eval_loss"] for r in runs)}


if __name__ == "__main__":
    raise SystemExit(main())
