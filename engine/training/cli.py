"""The training commands of ``python -m engine``: train, runs, stop, resume, show.

They work on the same run directories as the dashboard, so a run started here shows up
in the browser and a run started in the browser can be stopped here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from engine.errors import LoraLabError
from engine.training import rundir

DEFAULT_RUNS_DIR = Path(os.environ.get("LORALAB_RUNS_DIR", "runs"))


def _runs_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="folder of run directories")


def _fail(error: LoraLabError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _say_busy_devices() -> None:
    """A run started while another trains waits for the device; say for whom, so the wait is no mystery."""
    from engine.training import devices

    for key, holder in devices.busy_devices().items():
        print(f"note: {devices.describe(key)} is in use by {devices.holder_text(holder)}; "
              "this run waits for it if it trains there (python -m engine show tells).")


def follow(run_dir: Path, process=None) -> str:
    """Print a progress bar from the run directory until the run ends; Ctrl-C asks it to stop."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", dynamic_ncols=True, desc=run_dir.name, mininterval=1.0)
    offset = 0
    last_state = None
    while True:
        try:
            status = rundir.read_run_status(run_dir)
            state = status.state
            if status.max_steps and bar.total != status.max_steps:
                bar.total = status.max_steps
                bar.refresh()
            records, offset = rundir.read_jsonl(rundir.RunPaths(run_dir).metrics, offset)
            for record in records:
                if record.get("event") == "eval":
                    bar.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}")
                elif record.get("event") == "task_eval":
                    bar.write(f"step {record['step']}: {record['metric']} {record['score']:.3f} on {record['n']} "
                              f"held-out prompts ({record['seconds']:.1f} s)")
                elif record.get("loss") is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=record.get("tokens_per_second"))
            if status.step != bar.n:
                bar.update(status.step - bar.n)
            if (state, status.message) != last_state and (state != "training" or last_state is None
                                                           or last_state[0] != "training"):
                bar.write(f"[{state}] {status.message}")  # a new state, or news within it (waiting for the device)
                last_state = (state, status.message)
            if state in rundir.TERMINAL_STATES and (process is None or process.poll() is not None):
                break
            if process is not None and process.poll() is not None and state not in rundir.TERMINAL_STATES:
                from engine.training.jobs import mark_dead_worker

                mark_dead_worker(run_dir, process.returncode)
                continue
            time.sleep(0.5)
        except KeyboardInterrupt:
            from engine.training.jobs import request_stop

            try:
                outcome = request_stop(run_dir, process=process, reason="Stopped by force (a second Ctrl-C).")
            except LoraLabError:
                continue  # the worker is already gone; the loop says how it ended
            if outcome == "requested":
                bar.write("stop requested: finishing the current step and saving (Ctrl-C again to kill)")
    bar.close()
    status = rundir.read_run_status(run_dir)
    for sentence in status.fallbacks:
        print(f"note: {sentence}")
    if status.error:
        print(f"{status.state}: {status.error}", file=sys.stderr)
    print(f"run {run_dir.name}: {status.state} ({run_dir})")
    return status.state


def train_main(argv: list[str]) -> int:
    from engine.config import load_preset

    parser = argparse.ArgumentParser(prog="python -m engine train", description="Start a training run and follow it.")
    parser.add_argument("preset", help="preset name (demo-lora) or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--name", help="run name (default: timestamp and method)")
    parser.add_argument("--detach", action="store_true", help="start the worker and return at once")
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    from engine.training.jobs import spawn_worker

    try:
        config = load_preset(args.preset, args.overrides).validate()
        run_dir = rundir.create_run(args.runs_dir, config, name=args.name)
        process = spawn_worker(run_dir)
    except LoraLabError as error:
        return _fail(error)
    print(f"run {run_dir.name} started (worker pid {process.pid}); log: {rundir.RunPaths(run_dir).log}")
    from engine.config.build import boosters_line

    print(boosters_line(config))  # what the config asks for; fallbacks follow as notes
    if config.distributed.strategy != "none":  # the Train form's Multi-GPU line, and where the commands are
        from engine.config.gpus import gpus_line

        print(gpus_line())
        print(f"{config.distributed.strategy}: {config.distributed.world_size} processes through accelerate; its "
              f"config and each machine's launch command: {run_dir / 'accelerate'}")
    _say_busy_devices()
    if args.detach:
        return 0
    state = follow(run_dir, process)
    return {"completed": 0, "stopped": 3}.get(state, 1)


def runs_main(argv: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m engine runs", description="List runs.")
    parser.add_argument("--json", action="store_true")
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    rows = [summary.as_row() for summary in rundir.list_runs(args.runs_dir)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {args.runs_dir}")
        return 0
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c] if r[c] is not None else "-")) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c] if row[c] is not None else "-").ljust(widths[c]) for c in columns))
    return 0


def stop_main(argv: list[str]) -> int:
    from engine.training.jobs import request_stop

    parser = argparse.ArgumentParser(prog="python -m engine stop", description="Stop a run (twice, or --force: kill).")
    parser.add_argument("run")
    parser.add_argument("--force", action="store_true")
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    try:
        outcome = request_stop(rundir.resolve_run(args.runs_dir, args.run, allow_path=True), force=args.force)
    except LoraLabError as error:
        return _fail(error)
    print({"requested": "stop requested: the worker finishes its step, saves and exits",
           "killed": "worker killed"}[outcome])
    return 0


def resume_main(argv: list[str]) -> int:
    from engine.training.jobs import spawn_worker

    parser = argparse.ArgumentParser(prog="python -m engine resume", description="Resume from the last checkpoint.")
    parser.add_argument("run")
    parser.add_argument("--detach", action="store_true")
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    try:
        run_dir = rundir.resolve_run(args.runs_dir, args.run, allow_path=True)
        state = rundir.read_run_status(run_dir).state
        if state not in ("stopped", "interrupted", "failed"):
            raise rundir.RunError(f"Run '{run_dir.name}' is {state}; "
                                  "only a stopped, interrupted or failed run can resume.")
        print(f"run {run_dir.name} ({state}):" + rundir.resume_hint(run_dir) + "".join(
            f" {p.name} is incomplete and is not used." for p in rundir.incomplete_checkpoints(run_dir)))
        process = spawn_worker(run_dir, resume=True)
    except LoraLabError as error:
        return _fail(error)
    _say_busy_devices()
    if args.detach:
        return 0
    return {"completed": 0, "stopped": 3}.get(follow(run_dir, process), 1)


def show_main(argv: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m engine show", description="Show one run.")
    parser.add_argument("run")
    parser.add_argument("--log-lines", type=int, default=20)
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    try:
        run_dir = rundir.resolve_run(args.runs_dir, args.run, allow_path=True)
    except LoraLabError as error:
        return _fail(error)
    summary = rundir.summarize_run(run_dir)  # never raises: damage becomes notes
    status = rundir.read_status(run_dir)
    print(json.dumps({k: v for k, v in status.items() if k not in ("history", "notes")}, indent=2, default=str))
    for note in summary.notes:
        print(f"note: {note}")
    from engine.training.trackers import read_destinations

    for item in read_destinations(run_dir):
        print(f"--- {item.get('label')}: {item.get('where')}\n    open: {item.get('open')}")
    for script in sorted((run_dir / "accelerate").glob("launch_machine_*.sh")):  # a multi-GPU run's machines
        command = script.read_text(encoding="utf-8").strip().splitlines()[-1]
        print(f"--- {script.stem.replace('_', ' ')} ({script}):\n    {command}")
    print("--- train.log (tail)")
    print(rundir.log_tail(run_dir, args.log_lines))
    return 0


def evaluate_main(argv: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser(
        prog="python -m engine evaluate",
        description="Score a run's adapter and its base on the held-out prompts with a task metric (greedy answers).")
    parser.add_argument("run")
    parser.add_argument("--metric", help="a metric name (default: the run's eval.metric, else exact_match)")
    parser.add_argument("--limit", type=int, help="score only the first N held-out prompts (default: all)")
    parser.add_argument("--checkpoint", default="adapter", help="checkpoint-N instead of the final adapter")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (with a few answers)")
    _runs_dir_arg(parser)
    args = parser.parse_args(argv)
    from engine.training.task_eval import evaluate_run

    try:
        run_dir = rundir.resolve_run(args.runs_dir, args.run)
        result = evaluate_run(run_dir, metric=args.metric, limit=args.limit, adapter=args.checkpoint,
                              log=(lambda *_: None) if args.json else print)
    except LoraLabError as error:
        return _fail(error)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
