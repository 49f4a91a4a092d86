"""``python -m engine compare RUN [--against OTHER]``: base (or another adapter) and fine-tuned answers to a prompt
set, headless.

For qualitative checks without the dashboard (and in scripts: ``--json``). The same
``engine.chat.models.ChatModels`` the Chat tab uses, so answers match what the tab shows for the
same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.chat.models import ChatModels, Comparison, Sampling
from engine.chat.prompts import held_out_prompts, prompts_from_file
from engine.chat.ratings import BASE, FINETUNED, describe_win_rate, win_rate, win_rate_record
from engine.chat.sources import LATEST, AdapterSource, resolve_adapter
from engine.errors import LoraLabError, RunError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine compare",
        description="Answer prompts with a run's base model (or --against another adapter of that base) and its "
                    "fine-tuned adapter, one copy of the base.")
    parser.add_argument("run", help="a run name inside --runs-dir, a run folder, or a PEFT adapter folder")
    parser.add_argument("--runs-dir", type=Path, default=Path(os.environ.get("LORALAB_RUNS_DIR", "runs")),
                        help="folder of run directories (default: runs)")
    parser.add_argument("--checkpoint", default=LATEST,
                        help="'latest' (default), 'adapter', or a checkpoint: 'checkpoint-90' or '90'")
    parser.add_argument("--against", metavar="RUN_OR_FOLDER",
                        help="answer on the left with this adapter (same base) instead of the base with the adapter "
                             "off; a release's versions: python -m engine release compare NAME")
    add_sampling_args(parser)
    return parser


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The prompt-set and sampling options every comparison command shares."""
    parser.add_argument("--prompts", metavar="FILE",
                        help="a .txt file (one prompt per line) or a dataset file; default: the run's held-out split")
    parser.add_argument("--limit", type=int, default=10, help="at most this many prompts (default 10; 0: all)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic)")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature)
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens)
    parser.add_argument("--repetition-penalty", type=float, default=Sampling.repetition_penalty)
    parser.add_argument("--seed", type=int, default=Sampling.seed)
    parser.add_argument("--system", default="", help="system prompt put before every prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _print_text(rows: list[Comparison], labels: dict, out) -> None:
    for number, row in enumerate(rows, start=1):
        print(f"=== prompt {number}/{len(rows)} ===", file=out)
        print(row.prompt, file=out)
        print(f"--- left: {labels[BASE]} ---", file=out)
        print(row.base, file=out)
        print(f"--- right: {labels[FINETUNED]} ---", file=out)
        print(row.finetuned, file=out)
        if row.reference is not None:
            print("--- reference ---", file=out)
            print(row.reference, file=out)
        print(file=out)
    scored = [r for r in rows if r.reference is not None]
    if scored:
        mean = lambda values: sum(values) / len(values)
        print(f"token F1 against the reference over {len(scored)} prompt(s): left "
              f"{mean([r.base_f1 for r in scored]):.3f}, right {mean([r.finetuned_f1 for r in scored]):.3f}",
              file=out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = resolve_adapter(args.runs_dir, args.run, args.checkpoint)
        against = resolve_adapter(args.runs_dir, args.against) if args.against else None
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_comparison(source, against, args)


def run_comparison(source: AdapterSource, against: AdapterSource | None, args) -> int:
    """Answer the prompt set of ``args`` (``add_sampling_args``) with both sides and print it; an exit code."""
    try:
        if args.prompts:
            prompts = prompts_from_file(args.prompts)
        elif source.prompts_run is not None:
            prompts = held_out_prompts(source.prompts_run)
        else:
            raise RunError("An adapter folder outside a run has no held-out split: pass --prompts FILE.")
        if args.limit > 0:
            prompts = prompts[: args.limit]
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            greedy=args.greedy).validated()
        models = ChatModels()
        print(models.load(source, against=against), file=sys.stderr)
        rows = []
        for row in models.compare(prompts, sampling, system_prompt=args.system):
            rows.append(row)
            print(f"answered {len(rows)}/{len(prompts)}", file=sys.stderr)
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = models.side_labels()
    against_path = str(against.path) if against else None
    if args.json:
        document = {"run": str(source.run_dir) if source.run_dir else None, "adapter": str(source.path),
                    "label": source.label, "base_model": source.base_model, "against": against_path,
                    "sides": {"left": labels[BASE], "right": labels[FINETUNED]}, "sampling": sampling.as_dict(),
                    "system_prompt": args.system, "results": [r.as_dict() for r in rows]}
        if source.run_dir is not None:
            document["blind_ratings"] = win_rate_record(source.run_dir, against_path)
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        _print_text(rows, labels, sys.stdout)
        if source.run_dir is not None:
            print(describe_win_rate(*win_rate(source.run_dir, against_path), over=against.label if against else None))
    return 0
