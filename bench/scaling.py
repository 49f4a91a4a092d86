"""Data-parallel scaling: tokens/s of the demo LoRA run on 1 process and on N (DDP through accelerate).

Each contender is a real run, started exactly as the dashboard starts it (``rundir.create_run`` +
``jobs.spawn_worker``: the worker alone, or ``engine.training.launch`` -> ``accelerate launch`` ->
N workers), alternated ``--runs`` times. Every process gets the same per-device batch (weak
scaling, as data parallelism is used: N processes take N times the rows per optimizer step), so
the ideal is N times the tokens/s of one process, and

    efficiency = tokens/s(N) / (N x tokens/s(1)).

tokens/s is the run's own figure (``tokens_seen`` in metrics.jsonl, summed over every rank by
transformers) over the steady steps: from step ``--skip`` to the last, so loading, the first
steps' allocations and the final save are left out. On the CPU each process gets one thread
(OMP_NUM_THREADS=1), so N processes need N free cores to scale; on a machine shared with other
work the figures are noisy. On a GPU machine, the same command measures N GPUs.

    python bench/scaling.py [--processes 2] [--runs 2] [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def steady_tokens_per_second(run_dir: Path, skip: int) -> tuple[float, int]:
    """Tokens per wall-second between the logged steps ``skip`` and the last; and the tokens counted."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if r.get("event") == "log" and r.get("tokens_seen") is not None]
    start = next(r for r in logs if r["step"] >= skip)
    end = logs[-1]
    tokens = end["tokens_seen"] - start["tokens_seen"]
    return tokens / (end["t"] - start["t"]), tokens


def run_once(runs_dir: Path, name: str, processes: int, steps: int, batch: int, skip: int) -> dict:
    from engine.config import load_preset
    from engine.training import rundir
    from engine.training.jobs import spawn_worker

    overrides = ["eval.metric=none", "data.eval_path=", "data.eval_fraction=0", f"train.max_steps={steps}",
                 "train.logging_steps=1", f"train.save_steps={steps * 10}",
                 f"train.per_device_train_batch_size={batch}"]
    if processes > 1:
        overrides += ["distributed.strategy=ddp", f"distributed.num_processes={processes}"]
    config = load_preset("demo-lora", overrides).validate()
    run_dir = rundir.create_run(runs_dir, config, name=name)
    started = time.time()
    code = spawn_worker(run_dir).wait()
    wall = time.time() - started
    status = rundir.read_run_status(run_dir)
    if code != 0 or status.state != "completed":
        raise SystemExit(f"{name}: {status.state} ({status.error}); see {run_dir / 'train.log'}")
    speed, tokens = steady_tokens_per_second(run_dir, skip)
    return {"processes": processes, "tokens_per_s": speed, "tokens": tokens, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="N: the data-parallel contender's processes")
    parser.add_argument("--runs", type=int, default=2, help="runs of each contender, alternated")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="rows per process per step")
    parser.add_argument("--skip", type=int, default=3, help="steps left out at the start (warm-up)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from engine.demo import ensure_demo_model

    ensure_demo_model()
    results: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory(prefix="loralab-scaling-") as scratch:
        for attempt in range(args.runs):
            for processes in (1, args.processes):
                result = run_once(Path(scratch), f"p{processes}-{attempt}", processes, args.steps, args.batch,
                                  args.skip)
                results[processes].append(result)
                print(f"run {attempt + 1}/{args.runs}, {processes} process{'es' if processes > 1 else ''}: "
                      f"{result['tokens_per_s']:,.0f} tokens/s over {result['tokens']:,} tokens "
                      f"(run took {result['wall_s']:.1f} s)", flush=True)
    one = statistics.median(r["tokens_per_s"] for r in results[1])
    many = statistics.median(r["tokens_per_s"] for r in results[args.processes])
    n = args.processes
    print(f"\nmedian tokens/s: 1 process {one:,.0f}; {n} processes {many:,.0f} "
          f"(speed-up {many / one:.2f}x, ideal {n}x)")
    print(f"scaling efficiency: {many / (n * one):.0%}  (tokens/s({n}) / ({n} x tokens/s(1)); "
          f"{os.cpu_count()} CPUs here, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} per process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
