"""Presets: known-good starting points, one YAML file each under ``presets/``."""

from __future__ import annotations

from pathlib import Path

from engine import PRESETS_DIR
from engine.config.schema import RunConfig


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (``demo-lora``) or a YAML path, as a path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    return path


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset by name (``demo-lora``) or a YAML path, with ``section.field=value`` overrides."""
    return RunConfig.from_yaml(preset_path(name_or_path), overrides)
