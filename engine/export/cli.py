"""``python -m engine export RUN``: the Export tab's adapter package or merged model, headless."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import LoraLabError
from engine.export.exporter import DTYPES, export_run, zip_export
from engine.training import rundir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine export",
                                     description="Export a run's adapter package or merged model, verified, with a "
                                                 "model card and lineage.json.")
    parser.add_argument("run", help="a run name inside --runs-dir, or a run folder")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--exports-dir", type=Path, default=Path("exports"))
    parser.add_argument("--name", help="export folder name inside --exports-dir (default: <run>-adapter or "
                                       "<run>-merged-<dtype>)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--adapter", dest="kind", action="store_const", const="adapter",
                      help="the PEFT adapter package (default)")
    kind.add_argument("--merged", dest="kind", action="store_const", const="merged",
                      help="a standalone model with the adapter merged in")
    parser.set_defaults(kind="adapter")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="merged model dtype (default bf16)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export of the same name")
    parser.add_argument("--zip", action="store_true", help="also write <name>.zip beside the export")
    parser.add_argument("--push", metavar="REPO_ID", help="then upload the export to this Hugging Face Hub "
                                                          "repository (owner/name), made if missing; needs a token")
    parser.add_argument("--private", action="store_true", help="with --push: create the repository private")
    args = parser.parse_args(argv)
    if args.push:
        from engine.export.push import push_problem

        problem = push_problem(args.push)  # within seconds, before the export's minutes of work
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1

    def say(fraction: float, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", flush=True)

    try:
        run_dir = rundir.resolve_run(args.runs_dir, args.run, allow_path=True)
        result = export_run(run_dir, args.exports_dir, kind=args.kind, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, name=args.name, overwrite=args.overwrite, progress=say)
        print(result.summary())
        if args.zip:
            print(f"zip: {zip_export(args.exports_dir, result.name, progress=None)}")
        if args.push:
            from engine.export.push import push_export

            say(0.95, f"Pushing {result.name} to the Hugging Face Hub as {args.push}.")
            print(f"pushed: {push_export(result.path, args.push, private=args.private)}")
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
