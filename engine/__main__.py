"""``python -m engine COMMAND ...``: the headless face of everything the dashboard does.

Each command lives with the module that does the work; this file only dispatches, and
imports nothing heavy, so ``python -m engine runs`` answers instantly.
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
    "evaluate": ("engine.training.cli", "evaluate_main", "score a run's adapter and its base with a task metric"),
    "memory": ("engine.measurements.cli", "memory_main",
               "estimate training memory term by term; --measure: full/LoRA/QLoRA measured here"),
    "data": ("engine.data.cli", "main", "inspect a dataset: format, counts, token statistics, problems"),
    "compare": ("engine.chat.cli", "main", "answer prompts with the base and the fine-tuned model"),
    "export": ("engine.export.cli", "main", "export a run's adapter or merged model"),
    "demo": ("engine.demo", "cli_main", "build the offline demo model (once; cached)"),
}


def usage() -> str:
    lines = ["usage: python -m engine COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
