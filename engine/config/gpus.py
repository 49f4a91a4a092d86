"""The GPUs NVML sees on this machine: what a multi-GPU config is checked against and the Train form shows.

NVML (not torch) because the dashboard's start-up imports no torch, and NVML lists every GPU
whatever ``CUDA_VISIBLE_DEVICES`` says to this process. Read once per process: GPUs do not come
and go while a dashboard runs (``visible_gpus.cache_clear()`` reads them again).
"""

from __future__ import annotations

import functools


def _nvml():
    """The pynvml module, or None (a machine without the package or the driver has no GPU to offer)."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@functools.lru_cache(maxsize=1)
def visible_gpus() -> tuple[str, ...]:
    """The names of this machine's GPUs in NVML index order; () when NVML has none or cannot say."""
    nvml = _nvml()
    if nvml is None:
        return ()
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: the bindings raise many types, all meaning "no GPU here"
        return ()
    try:
        names = []
        for index in range(nvml.nvmlDeviceGetCount()):
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return tuple(names)
    except Exception:  # noqa: BLE001 - same: a machine whose NVML fails offers no GPU to check against
        return ()
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def gpus_line() -> str:
    """One line for the Train form: what a multi-GPU run can use here."""
    gpus = visible_gpus()
    if not gpus:
        return ("NVML sees no GPU on this machine: a ddp run starts its processes on the CPU (gloo backend), "
                "sharing its cores; fsdp needs GPUs.")
    return f"NVML sees {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}: " + \
        ", ".join(f"{index}: {name}" for index, name in enumerate(gpus)) + "."
