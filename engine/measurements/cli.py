"""``python -m engine memory``: the estimator, and with ``--measure`` the measured comparison.

The estimator's options (``engine.memory.cli``) describe the training setup either way; the
measurement adds which methods, how many steps, and where measurements are kept::

    python -m engine memory --measure                          # smollm2-360m, random weights, 3 runs
    python -m engine memory --measure --model ./my-model --methods lora,qlora --seq-len 128
    python -m engine memory --measurements                     # saved measurements
    python -m engine memory --show-measurement 20250101-120000-smollm2-360m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.errors import LoraLabError
from engine.measurements.measure import (
    DEFAULT_MODEL,
    METHODS,
    MeasureRequest,
    format_result,
    list_measurements,
    measurement_settings,
    read_measurement,
    resolve_measurement,
    run_measurement,
)
from engine.memory import cli as estimate_cli
from engine.training.cli import DEFAULT_RUNS_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = estimate_cli.build_parser()
    parser.description = ("Predict the memory of a fine-tuning step term by term; with --measure, also train a few "
                          "steps of full fine-tuning, LoRA and QLoRA here and set what they really held beside it.")
    group = parser.add_argument_group("measured comparison")
    group.add_argument("--measure", action="store_true",
                       help=f"train --steps steps of each method in its own worker and compare (model default: "
                            f"{DEFAULT_MODEL}, built once with random weights; batch 1 x 48 tokens)")
    group.add_argument("--methods", default=",".join(METHODS), help="which of full, lora, qlora to measure")
    group.add_argument("--steps", type=int, default=2, help="optimizer steps per method (default 2)")
    group.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR,
                       help="measurements are kept in RUNS_DIR/.measure/<id>/")
    group.add_argument("--measurements", action="store_true", help="list saved measurements")
    group.add_argument("--show-measurement", metavar="ID", help="print a saved measurement")
    return parser


def memory_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.measure or args.measurements or args.show_measurement):
        return estimate_cli.run(args)
    try:
        if args.measurements:
            rows = list_measurements(args.runs_dir)
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in rows if not args.json else []:
                print(f"{row['id']:<40} {row['state']:<11} {row['headline']}")
            if not rows and not args.json:
                print(f"no measurements in {args.runs_dir}/.measure")
            return 0
        if args.show_measurement:
            result = read_measurement(resolve_measurement(args.runs_dir, args.show_measurement))
        else:
            if args.dims:
                raise LoraLabError("--dims describes an architecture without weights; to measure, give --model "
                                   "(a catalog id, a model folder, 'demo' or a hub id).")
            settings = estimate_cli.settings_from_args(args, measurement_settings())
            request = MeasureRequest(model=args.model or DEFAULT_MODEL, settings=settings,
                                     methods=tuple(args.methods.split(",")), steps=args.steps)
            say = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
            try:
                result = run_measurement(request, args.runs_dir, progress=say)
            except KeyboardInterrupt:
                print("interrupted: the measurement's workers were stopped", file=sys.stderr)
                return 130
            result["state"] = "complete"
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(memory_main())
