"""The run contract: ``RunConfig`` (typed, validated where each field is defined) and presets."""

from engine.config.schema import (
    METHODS, OPTIMIZERS, SCHEDULERS, RunConfig, field_help, list_presets, load_preset,
)

__all__ = ["METHODS", "OPTIMIZERS", "SCHEDULERS", "RunConfig", "field_help", "list_presets", "load_preset"]
