"""``python -m engine COMMAND ...``: the headless face of everything the dashboard does.

Each command lives with the module that does the work; this file only dispatches, and
imports nothing heavy, so ``python -m engine runs`` answers instantly. The ``loralab``
command (app.cli) dispatches through this same table, with ``ui`` added for the dashboard.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("engine.training.cli", "train_main", "start a training run from a preset or YAML and follow it"),
    "runs": ("engine.training.cli", "runs_main", "list runs with their status and losses"),
    "stop": ("engine.training.cli", "stop_main", "ask a running run to stop (twice: force)"),
    "resume": ("engine.training.cli", "resume_main", "continue a stopped or interrupted run from its last checkpoint"),
    "show": ("engine.training.cli", "show_main", "print a run's status, fallbacks, error and log tail"),
    "sweep": ("engine.sweeps.cli", "main",
              "train a preset once per value of a field (--vary lora.r=4,8,16), one at a time; sweep show|stop"),
    "evaluate": ("engine.training.cli", "evaluate_main", "score a run's adapter and its base with a task metric"),
    "eval": ("engine.releases.cli", "eval_main",
             "eval report: base, adapter and current release on one base (metric, policy, latency, flips)"),
    "release": ("engine.releases.cli", "release_main",
                "versioned releases: promote through a gate, rollback, list, show, serving bundles"),
    "memory": ("engine.measurements.cli", "memory_main",
               "estimate training memory term by term; --measure: full/LoRA/QLoRA measured here"),
    "data": ("engine.data.cli", "main", "inspect a dataset: format, counts, token statistics, problems"),
    "compare": ("engine.chat.cli", "main", "answer prompts with the base and the fine-tuned model"),
    "export": ("engine.export.cli", "main", "export a run's adapter or merged model (--push: to the Hub)"),
    "demo": ("engine.demo_pretrain", "cli_main", "check the shipped demo model (or pretrain it again)"),
}


def version_text() -> str:
    """``loralab 0.2.0 (git <commit>)``: the version and the commit this code came from."""
    from engine import __version__
    from engine.lineage import git_commit

    git = git_commit()
    if git.get("commit"):
        where = f"git {git['commit'][:12]}{', with uncommitted changes' if git.get('dirty') else ''}"
    else:
        where = "git commit unknown: not run from a git checkout"
    return f"loralab {__version__} ({where})"


def usage(prog: str = "python -m engine", commands: dict | None = None) -> str:
    commands = COMMANDS if commands is None else commands
    width = max(map(len, commands))
    lines = [f"usage: {prog} COMMAND [ARGS]   ({prog} COMMAND --help lists a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in commands.items()]
    lines += ["", "  --version  print the version and the git commit"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m engine", commands: dict | None = None) -> int:
    """Run ``argv[0]`` from ``commands`` (this module's table unless given) with the rest of ``argv``."""
    commands = COMMANDS if commands is None else commands
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, commands))
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(version_text())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"unknown command '{command}'\n\n{usage(prog, commands)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = commands[command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
