"""Configs compared: as a preset plus ``--set`` overrides (the "Show command" line), and side by side."""

from __future__ import annotations

import shlex

from engine.config.presets import list_presets, load_preset
from engine.config.schema import RunConfig


def render_value(value) -> str:
    """A value as ``--set`` reads it back (YAML scalars; lists comma-separated)."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        import json

        return json.dumps(value)
    return str(value)


def overrides_between(base: RunConfig, config: RunConfig) -> list[str]:
    """``section.field=value`` for every field where ``config`` differs from ``base``."""
    before, after = base.flat(), config.flat()
    return [f"{key}={render_value(value)}" for key, value in after.items()
            if key != "name" and before.get(key) != value]


def command_line(preset: str, config: RunConfig) -> str:
    """The headless equivalent of a form: the preset plus a ``--set`` for every field that differs."""
    overrides = [f"--set {shlex.quote(item)}" for item in overrides_between(load_preset(preset), config)]
    preset_arg = f"presets/{preset}.yaml" if preset in list_presets() else shlex.quote(preset)
    return " \\\n  ".join([f"python -m engine train {preset_arg}"] + overrides)


def config_diff(configs: dict[str, RunConfig | None]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of configs side by side; fields whose values differ come first, marked ≠."""
    flat = {name: (config.flat() if config is not None else {}) for name, config in configs.items()}
    keys = list(dict.fromkeys(key for row in flat.values() for key in row))
    differing = [k for k in keys if len({repr(row.get(k)) for row in flat.values()}) > 1]
    same = [k for k in keys if k not in differing]
    table = [[f"≠ {k}"] + [str(row.get(k)) for row in flat.values()] for k in differing]
    table += [[k] + [str(row.get(k)) for row in flat.values()] for k in same]
    return ["field", *configs], table
