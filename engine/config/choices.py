"""Allowed values that transformers owns: scheduler and optimizer names.

transformers defines them as enums (``trainer_utils.SchedulerType``,
``training_args.OptimizerNames``); we offer exactly those. Importing either module costs
about 3.5 s here (it pulls in torch, accelerate and peft), which the dashboard and
``python -m engine runs`` must not pay just to fill a dropdown, so when transformers is not
imported yet the enum's members are read from its installed source with ``ast`` (a few ms).
Once transformers is loaded (the worker), the real enum is used. A test checks both agree.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path


@cache
def transformers_enum(module: str, class_name: str) -> tuple[str, ...]:
    """The string values of ``transformers.<module>.<class_name>``, in declaration order."""
    full = f"transformers.{module}"
    if full in sys.modules:
        return tuple(member.value for member in getattr(sys.modules[full], class_name))
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise ImportError("transformers is not installed: pip install -r requirements.txt")
    source = Path(spec.origin).parent / f"{module.replace('.', '/')}.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            values = tuple(item.value.value for item in node.body
                           if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant)
                           and isinstance(item.value.value, str))
            if values:
                return values
    # The source layout changed: pay for the import rather than guess.
    return tuple(member.value for member in getattr(importlib.import_module(full), class_name))


def scheduler_names() -> tuple[str, ...]:
    return transformers_enum("trainer_utils", "SchedulerType")


def optimizer_names() -> tuple[str, ...]:
    return transformers_enum("training_args", "OptimizerNames")
