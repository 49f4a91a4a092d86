"""``python -m engine eval RUN`` and ``python -m engine release promote|rollback|list|show|bundle|compare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.errors import LoraLabError
from engine.training.cli import DEFAULT_RUNS_DIR


def _fail(error: LoraLabError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _releases_dir_arg(parser: argparse.ArgumentParser) -> None:
    from engine.releases.store import DEFAULT_RELEASES_DIR

    parser.add_argument("--releases-dir", type=Path, default=DEFAULT_RELEASES_DIR, help="folder of releases")


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine eval",
        description="Answer a private eval set with the base, the run's adapter and (--against) the current release "
                    "on one copy of the base; write RUN/eval/report.json and report.html.")
    parser.add_argument("run")
    parser.add_argument("--prompts", help="a prompts file with references (default: the run's held-out split)")
    parser.add_argument("--against", metavar="RELEASE", help="also answer with this release's current version")
    parser.add_argument("--policy", help="policy YAML/JSON: forbidden_phrases, forbidden_regexes, max_chars, "
                                         "must_refuse (default: RUN/eval/policy.yaml when present)")
    parser.add_argument("--metric", help="task metric (default: the run's eval.metric)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _releases_dir_arg(parser)
    args = parser.parse_args(argv)
    from engine.releases.report import make_report, report_dir
    from engine.training import rundir

    quiet = lambda *_: None
    try:
        run_dir = rundir.resolve_run(args.runs_dir, args.run, allow_path=True)
        report = make_report(run_dir, prompts_file=args.prompts, against=args.against,
                             releases_dir=args.releases_dir, policy_file=args.policy, limit=args.limit,
                             metric=args.metric, log=quiet if args.json else print)
    except LoraLabError as error:
        return _fail(error)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"report: {report_dir(run_dir) / 'report.json'} and report.html")
    return 0


def _gate_args(parser: argparse.ArgumentParser) -> None:
    from engine.releases.gate import Gate

    defaults = Gate()
    parser.add_argument("--min-gain", type=float, default=defaults.min_gain_points,
                        help="task metric points (score x 100) above the current release (default %(default)s)")
    parser.add_argument("--max-new-schema-errors", type=int, default=defaults.max_new_schema_errors)
    parser.add_argument("--max-new-violations", type=int, default=defaults.max_new_policy_violations)
    parser.add_argument("--max-latency-increase", type=float, default=defaults.max_latency_increase_pct,
                        help="percent, for p95 time to first token and per token (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="promote even when the gate refuses (recorded)")
    parser.add_argument("--note", help="a note kept in the history")


def release_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine release",
                                     description="Versioned releases of adapters: promote through a gate, roll back, "
                                                 "list, show, make serving bundles.")
    commands = parser.add_subparsers(dest="action", required=True)
    promote_p = commands.add_parser("promote", help="make a run's adapter the next version if its report passes")
    promote_p.add_argument("name", help="release name")
    promote_p.add_argument("run", help="run name or folder (evaluated with `python -m engine eval`)")
    promote_p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _gate_args(promote_p)
    rollback_p = commands.add_parser("rollback", help="make the previous version current again")
    rollback_p.add_argument("name")
    rollback_p.add_argument("--reason")
    commands.add_parser("list", help="releases with their current and previous versions")
    show_p = commands.add_parser("show", help="a release's versions and history")
    show_p.add_argument("name")
    bundle_p = commands.add_parser("bundle", help="serving bundles of a version: vLLM multi-LoRA, GGUF + Ollama")
    bundle_p.add_argument("name")
    bundle_p.add_argument("--version", default="current", help="current, previous or vN (default current)")
    bundle_p.add_argument("--vllm", action="store_true", help="the vLLM multi-LoRA bundle")
    bundle_p.add_argument("--gguf", action="store_true", help="GGUF f16 and Q8_0 + Ollama Modelfile, verified")
    compare_p = commands.add_parser("compare", help="answer prompts with two versions side by side on one base (the "
                                                    "Chat tab's current vs previous)")
    compare_p.add_argument("name")
    compare_p.add_argument("--left", default="previous", help="current, previous or vN (default previous)")
    compare_p.add_argument("--right", default="current", help="current, previous or vN (default current)")
    from engine.chat.cli import add_sampling_args

    add_sampling_args(compare_p)
    for sub in (rollback_p, show_p, bundle_p, compare_p, commands.choices["list"]):
        _releases_dir_arg(sub)
    _releases_dir_arg(promote_p)
    for sub in (show_p, commands.choices["list"], bundle_p):
        sub.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from engine.releases import store

    try:
        if args.action == "promote":
            from engine.releases.gate import Gate
            from engine.training import rundir

            gate = Gate(min_gain_points=args.min_gain, max_new_schema_errors=args.max_new_schema_errors,
                        max_new_policy_violations=args.max_new_violations,
                        max_latency_increase_pct=args.max_latency_increase)
            run_dir = rundir.resolve_run(args.runs_dir, args.run, allow_path=True)
            store.promote(args.releases_dir, run_dir, args.name, gate=gate, force=args.force, note=args.note)
        elif args.action == "rollback":
            store.rollback(args.releases_dir, args.name, reason=args.reason)
        elif args.action == "list":
            rows = store.list_releases(args.releases_dir)
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            elif not rows:
                print(f"no releases in {args.releases_dir}")
            for row in [] if args.json else rows:
                previous = f", previous v{row['previous']}" if row["previous"] else ""
                print(f"{row['name']}: current v{row['current']}{previous} "
                      f"(versions {', '.join(f'v{v}' for v in row['versions'])})")
        elif args.action == "show":
            info = store.show(args.releases_dir, args.name)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                print(f"{info['name']} ({info['path']}): current v{info['current']}, previous "
                      f"{'v' + str(info['previous']) if info['previous'] else 'none'}")
                for row in info["versions"]:
                    forced = " (forced)" if row["forced"] else ""
                    print(f"  v{row['version']}: run {row['run']}, {row['metric']} {row['score']}{forced}")
                for record in info["history"]:
                    print(f"  history: {record.get('action')} " + json.dumps(
                        {k: record.get(k) for k in ("version", "from", "to", "run", "reason") if record.get(k)}))
        elif args.action == "compare":
            from engine.chat.cli import run_comparison

            right = store.release_source(args.releases_dir, args.name, args.right)
            left = store.release_source(args.releases_dir, args.name, args.left)
            return run_comparison(right, left, args)
        elif args.action == "bundle":
            from engine.releases import bundles

            if not (args.vllm or args.gguf):
                args.vllm = args.gguf = True
            version = store.resolve_version(args.releases_dir, args.name, args.version)
            results, say = {}, (lambda *_: None) if args.json else print
            if args.vllm:
                results["vllm"] = bundles.vllm_bundle(version, log=say)
            if args.gguf:
                results["gguf"] = bundles.gguf_bundle(version, log=say)
            if args.json:
                print(json.dumps(results, indent=2, default=str))
    except store.PromotionRefused as error:
        print(f"refused: {error}", file=sys.stderr)
        return 3
    except LoraLabError as error:
        return _fail(error)
    return 0
