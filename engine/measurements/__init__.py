"""Measured memory: full fine-tuning, LoRA and QLoRA trained a few steps here, beside the prediction.

``measure`` runs the three workers through the job manager and saves a measurement folder
(``<runs_dir>/.measure/<id>/``); ``cli`` is ``python -m engine memory --measure`` (the
``memory`` command's estimator options plus the measurement's).
"""

from engine.measurements.measure import (
    DEFAULT_MODEL,
    METHODS,
    MeasureRequest,
    list_measurements,
    measurement_settings,
    measurement_table,
    preflight,
    read_measurement,
    resolve_measurement,
    run_config_for,
    run_measurement,
)

__all__ = [
    "DEFAULT_MODEL", "METHODS", "MeasureRequest", "list_measurements", "measurement_settings", "measurement_table",
    "preflight", "read_measurement", "resolve_measurement", "run_config_for", "run_measurement",
]
