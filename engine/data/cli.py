"""``python -m engine data inspect PATH_OR_ID ...``: the Dataset tab's figures on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from engine.data.formats import FORMAT_CHOICES
from engine.data.report import DEFAULT_MAX_LENGTH
from engine.errors import LoraLabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine data", description="Inspect a fine-tuning dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="detected format, counts, token statistics, warnings and errors (with file and line)",
        description="Print what the Dataset tab shows: detected format, counts, token statistics and warnings.",
    )
    inspect.add_argument("source", metavar="PATH_OR_ID", help="a file (.jsonl .json .csv .parquet), a hub id, or demo")
    inspect.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="override format detection")
    inspect.add_argument(
        "--model", default="demo", help="model name or folder whose tokenizer and chat template count tokens"
    )
    inspect.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="truncation length (tokens)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    inspect.add_argument("--columns", default=None, help="column map, e.g. 'instruction=question,output=answer'")
    inspect.add_argument("--skip-bad", action="store_true", help="skip malformed rows instead of stopping")
    inspect.add_argument("--eval-file", default=None, help="a second file used as the eval set")
    inspect.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this fraction for eval")
    inspect.add_argument("--seed", type=int, default=42, help="seed of the eval hold-out")
    inspect.add_argument("--batch-size", type=int, default=1, help="per-device batch size (for steps per epoch)")
    inspect.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.data.report import inspect_dataset

    if args.max_length is not None and args.max_length < 1:
        print("error: --max-length must be at least 1.", file=sys.stderr)
        return 2
    try:
        report = inspect_dataset(
            args.source,
            fmt=args.format,
            column_map=args.columns,
            skip_bad=args.skip_bad,
            split=args.split,
            model=args.model or None,
            max_length=args.max_length,
            eval_fraction=args.eval_fraction,
            eval_source=args.eval_file,
            seed=args.seed,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
        )
    except LoraLabError as exc:
        if args.json:
            where = {"path": getattr(exc, "path", None), "line": getattr(exc, "line", None)}
            print(json.dumps({"error": str(exc), **where}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0
