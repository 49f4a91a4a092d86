"""The memory estimator: parameters, weights, optimizer states and activations, term by term.

``arch`` reads model architectures (catalog, folders, hub configs), ``activations`` counts
what autograd saves op by op, ``estimator`` adds the terms up; ``cli`` is
``python -m engine memory``.
"""

from engine.memory.arch import ModelArch, catalog_ids, load_arch
from engine.memory.estimator import (
    GPUS,
    MemoryEstimate,
    MemorySettings,
    estimate,
    estimate_for_run_config,
    fits_on_gpus,
    format_bytes,
    settings_from_run_config,
)

__all__ = [
    "GPUS", "MemoryEstimate", "MemorySettings", "ModelArch", "catalog_ids", "estimate", "estimate_for_run_config",
    "fits_on_gpus", "format_bytes", "load_arch", "settings_from_run_config",
]
