"""Small device helpers shared by the modules that load whole models (chat, export)."""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Give memory back after a model was dropped: Python's garbage, then CUDA's cached blocks."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
