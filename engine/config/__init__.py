"""The run contract: ``RunConfig`` (typed; each field's rule in its metadata), presets, and the one
place it becomes library objects (``engine.config.build``: LoraConfig, BitsAndBytesConfig, SFTConfig).
"""

from engine.config.overrides import command_line, config_diff, overrides_between
from engine.config.presets import PRESETS_DIR, list_presets, load_preset, preset_path
from engine.config.schema import (
    METHODS,
    SECTIONS,
    FieldSpec,
    RunConfig,
    field_help,
    field_spec,
    field_specs,
)

__all__ = [
    "METHODS", "PRESETS_DIR", "SECTIONS", "FieldSpec", "RunConfig", "command_line", "config_diff", "field_help",
    "field_spec", "field_specs", "list_presets", "load_preset", "overrides_between", "preset_path",
]
