"""``python -m engine sweep``: start a sweep, ``sweep show SWEEP``, ``sweep stop SWEEP``, ``sweep list``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.errors import LoraLabError


def _fail(error: LoraLabError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _dirs(args) -> tuple[Path, Path]:
    from engine.sweeps.store import sweeps_dir_for

    return args.runs_dir, args.sweeps_dir or sweeps_dir_for(args.runs_dir)


def _common(parser: argparse.ArgumentParser) -> None:
    from engine.training.cli import DEFAULT_RUNS_DIR

    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="folder of run directories")
    parser.add_argument("--sweeps-dir", type=Path, default=None,
                        help="folder of sweeps (default: $LORALAB_SWEEPS_DIR, else sweeps/ beside the runs folder)")


def print_table(columns: list[str], rows: list[list]) -> None:
    cells = [[("-" if value is None or value == "" else str(value)) for value in row] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) if cells else len(column)
              for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row in cells:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)))


def start_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine sweep",
        description="Train a preset once per value of one field (or a small grid of two), one run at a time. "
                    "Also: sweep show SWEEP, sweep stop SWEEP, sweep list.")
    parser.add_argument("preset", help="preset name (demo-lora) or YAML path")
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a field and its values, e.g. --vary lora.r=4,8,16 or --vary "
                             "'lora.target_modules=q_proj,v_proj | all-linear' (once, or twice for a grid)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field for every run, e.g. --set train.max_steps=50")
    parser.add_argument("--name", help="sweep id (default: sweep-<time>-<field>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and predicted peaks; start nothing")
    parser.add_argument("--detach", action="store_true", help="run the sweep in the background and return at once")
    _common(parser)
    args = parser.parse_args(argv)
    from engine.sweeps import runner, spec, store, summary

    runs_dir, sweeps_dir = _dirs(args)
    try:
        plan = spec.expand(args.preset, args.vary, args.overrides)
    except LoraLabError as error:
        return _fail(error)
    print(f"{len(plan.runs)} run{'s' if len(plan.runs) != 1 else ''}, one at a time:")
    print_table([v.field for v in plan.varies] + ["predicted peak (MiB)"], plan.table())
    if args.dry_run:
        return 0
    try:
        sweep_dir = runner.start_sweep(plan, runs_dir, sweeps_dir, sweep_id=args.name)
    except LoraLabError as error:
        return _fail(error)
    print(f"sweep {sweep_dir.name}: {sweep_dir}")
    if args.detach:
        process = runner.spawn_runner(sweep_dir, runs_dir)
        print(f"running in the background (pid {process.pid}; log {sweep_dir / 'runner.log'}); "
              f"python -m engine sweep show {sweep_dir.name} follows it, sweep stop {sweep_dir.name} stops it")
        return 0
    try:
        state = runner.run_sweep(sweep_dir, runs_dir)
    except KeyboardInterrupt:
        print(runner.stop_sweep(sweep_dir, runs_dir))
        return 3
    sweep = store.read_sweep(sweep_dir)
    results = summary.read_results(sweep, runs_dir)
    print_table(summary.COLUMNS, [list(r.row().values()) for r in results])
    print(summary.recommendation(results))
    return 0 if state == "completed" else 1


def show_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine sweep show", description="A sweep's table and verdict.")
    parser.add_argument("sweep", help="sweep id or folder")
    parser.add_argument("--json", action="store_true")
    _common(parser)
    args = parser.parse_args(argv)
    from engine.sweeps import runner, store, summary

    runs_dir, sweeps_dir = _dirs(args)
    try:
        sweep_dir = store.resolve_sweep(sweeps_dir, args.sweep, allow_path=True)
        sweep = store.read_sweep(sweep_dir)
    except LoraLabError as error:
        return _fail(error)
    results = summary.read_results(sweep, runs_dir)
    state = store.sweep_state(sweep, runner.sweep_states(sweep, runs_dir))
    front_memory = [r.name for r in summary.pareto_front(results, "peak_memory_bytes")]
    front_time = [r.name for r in summary.pareto_front(results, "wall_time_s")]
    sentence = summary.recommendation(results)
    if args.json:
        print(json.dumps({"id": sweep.get("id"), "state": state, "vary": sweep.get("vary"),
                          "runs": [r.row() for r in results], "pareto_memory": front_memory,
                          "pareto_wall_time": front_time, "recommendation": sentence}, indent=2))
        return 0
    varied = ", ".join(f"{v['field']}={','.join(v['values'])}" for v in sweep.get("vary", []))
    print(f"sweep {sweep.get('id')} ({state}): {sweep.get('preset')}, varying {varied}")
    print_table(summary.COLUMNS, [list(r.row().values()) for r in results])
    print(f"Pareto (eval loss vs peak memory): {', '.join(front_memory) or '-'}")
    print(f"Pareto (eval loss vs wall time): {', '.join(front_time) or '-'}")
    print(sentence)
    return 0


def stop_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine sweep stop",
                                     description="Stop a sweep: its live run stops, its queued runs are dropped.")
    parser.add_argument("sweep", help="sweep id or folder")
    _common(parser)
    args = parser.parse_args(argv)
    from engine.sweeps import runner, store

    runs_dir, sweeps_dir = _dirs(args)
    try:
        print(runner.stop_sweep(store.resolve_sweep(sweeps_dir, args.sweep, allow_path=True), runs_dir))
    except LoraLabError as error:
        return _fail(error)
    return 0


def list_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine sweep list", description="List sweeps.")
    _common(parser)
    args = parser.parse_args(argv)
    from engine.sweeps import runner, store

    runs_dir, sweeps_dir = _dirs(args)
    names = store.list_sweeps(sweeps_dir)
    if not names:
        print(f"no sweeps in {sweeps_dir}")
    for name in names:
        try:
            sweep = store.read_sweep(sweeps_dir / name)
        except LoraLabError as error:
            print(f"{name}: {error}")
            continue
        state = store.sweep_state(sweep, runner.sweep_states(sweep, runs_dir))
        print(f"{name}  {state}  {len(sweep['runs'])} runs")
    return 0


def run_main(argv: list[str]) -> int:
    """What ``sweep --detach`` starts in the background: the sweep's queued runs, one at a time, until none is left."""
    import time

    parser = argparse.ArgumentParser(prog="python -m engine sweep run",
                                     description="Run a sweep's queued runs one at a time (what --detach starts).")
    parser.add_argument("sweep_dir", type=Path)
    _common(parser)
    args = parser.parse_args(argv)
    from engine.sweeps import runner

    say = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    try:
        state = runner.run_sweep(args.sweep_dir, args.runs_dir, say=say)
    except LoraLabError as error:
        return _fail(error)
    say(f"sweep {args.sweep_dir.name}: {state}")
    return 0


def main(argv: list[str]) -> int:
    """``sweep show|stop|list|run ...`` or ``sweep PRESET --vary ...``."""
    sub = {"show": show_main, "stop": stop_main, "list": list_main, "run": run_main}
    if argv and argv[0] in sub:
        return sub[argv[0]](argv[1:])
    return start_main(argv)
