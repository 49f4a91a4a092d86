"""Allowed values that transformers and TRL own: scheduler, optimizer and packing-strategy names.

transformers defines them as enums (``trainer_utils.SchedulerType``,
``training_args.OptimizerNames``); we offer exactly those. Importing either module costs
about 3.5 s here (it pulls in torch, accelerate and peft), which the dashboard and
``python -m engine runs`` must not pay just to fill a dropdown, so when transformers is not
imported yet the enum's members are read from its installed source with ``ast`` (a few ms).
Once transformers is loaded (the worker), the real enum is used. A test checks both agree.
TRL keeps the choices of its ``SFTConfig`` fields in each field's metadata; the same holds there.
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


@cache
def trl_field_choices(module: str, class_name: str, field_name: str) -> tuple[str, ...]:
    """The ``metadata["choices"]`` of a field of ``trl.<module>.<class_name>`` (read from source unless imported)."""
    full = f"trl.{module}"
    if full in sys.modules:
        import dataclasses

        fields = {f.name: f for f in dataclasses.fields(getattr(sys.modules[full], class_name))}
        return tuple(fields[field_name].metadata["choices"])
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        raise ImportError("trl is not installed: pip install -r requirements.txt")
    source = Path(spec.origin).parent / f"{module.replace('.', '/')}.py"
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == field_name \
                        and isinstance(item.value, ast.Call):
                    for keyword in item.value.keywords:
                        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                            metadata = {k.value: v for k, v in zip(keyword.value.keys, keyword.value.values)
                                        if isinstance(k, ast.Constant)}
                            if "choices" in metadata:
                                return tuple(ast.literal_eval(metadata["choices"]))
    import dataclasses  # the source layout changed: pay for the import rather than guess

    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(full), class_name))}
    return tuple(fields[field_name].metadata["choices"])


def packing_strategies() -> tuple[str, ...]:
    return trl_field_choices("trainer.sft_config", "SFTConfig", "packing_strategy")


def scheduler_names() -> tuple[str, ...]:
    return transformers_enum("trainer_utils", "SchedulerType")


def optimizer_names() -> tuple[str, ...]:
    return transformers_enum("training_args", "OptimizerNames")
