"""The worker side of a memory measurement: what a training process really held, phase by phase.

A run whose config sets ``train.memory_probe`` gets a :class:`MemoryProbe` among its
trainer callbacks (``make_memory_probe``) (``engine/training/worker.py`` reads the field in one place). The probe
writes ``memory_probe.json`` to the run directory:

* ``rss``: the process's resident memory before the weights load (its baseline), after
  they loaded, and the peaks while loading and while training (Linux resets the
  high-water mark through ``/proc/self/clear_refs``; elsewhere a thread samples it). Freed
  heap is handed back to the OS (``malloc_trim``) before the baseline and after loading, so
  RSS counts what the process holds rather than what loading once needed;
* ``tensors``: bytes of the base weights, the adapters, all gradients (at the optimizer
  step) and the optimizer states, read from the tensors themselves;
* ``live``: the live-tensor peak while training (:class:`~engine.memory.live.LiveBytesTracker`),
  the phase it happened in, the highest bytes of each phase, and what was alive at the
  peak, by kind (weights, adapters, gradients, optimizer states, and what forward,
  backward and the optimizer step made);
* ``cuda`` on a GPU: ``torch.cuda.memory_allocated`` after loading and
  ``max_memory_allocated`` / ``max_memory_reserved`` of training;
* the batch shape that was trained, and the runtime (device, precision, optimizer).

A probe run also skips the final checkpoint: writing full fine-tuning's weights and
optimizer states to disk is not part of a measurement and would take minutes on a CPU.
The normal training path creates no probe and pays nothing.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from engine.memory.live import LiveBytesTracker, storage_bytes
from engine.training.rundir import read_json, write_json_atomic

PROBE_FILE = "memory_probe.json"
PROBE_VERSION = 1


def read_probe(run_dir: Path) -> dict | None:
    """The probe record of a run directory, or None when it has none (yet)."""
    return read_json(Path(run_dir) / PROBE_FILE)


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def return_free_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so RSS counts what is held, not what was.

    Loading keeps the 16-bit checkpoint in memory for a moment (QLoRA then quantizes it); glibc keeps
    most of what is freed afterwards, and RSS would report a gigabyte the process no longer uses.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (macOS, musl): RSS stays as the allocator leaves it
        return False


class RssPeak:
    """The process's peak resident memory since the last ``reset``."""

    def __init__(self):
        self.source = "VmHWM"
        self._sampled = 0
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        try:
            # Linux: writing 5 resets the peak RSS (VmHWM) of this process to its current RSS.
            Path("/proc/self/clear_refs").write_text("5")
            return
        except OSError:
            pass
        self.source = "sampled every 10 ms"
        self._sampled = current_rss()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while True:
            self._sampled = max(self._sampled, current_rss())
            time.sleep(0.01)

    def peak(self) -> int:
        if self.source == "VmHWM":
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        return max(self._sampled, current_rss())


def make_memory_probe(run_dir: Path, runtime: dict | None = None):
    """The probe as a transformers ``TrainerCallback``; make it before the weights load (the RSS baseline)."""
    from transformers import TrainerCallback

    class MemoryProbeCallback(MemoryProbe, TrainerCallback):
        """MemoryProbe's methods are the callback's events."""

    return MemoryProbeCallback(run_dir, runtime)


class MemoryProbe:
    """Trainer events that measure memory (see the module docstring); transformers-free until used."""

    def __init__(self, run_dir: Path, runtime: dict | None = None):
        self.path = Path(run_dir) / PROBE_FILE
        trimmed = return_free_heap()
        self.rss = RssPeak()
        self.record: dict = {
            "version": PROBE_VERSION,
            "runtime": dict(runtime or {}),
            "rss": {"source": self.rss.source, "baseline_bytes": current_rss(), "malloc_trim": trimmed},
            "created_at": time.time(),
        }
        self.tracker: LiveBytesTracker | None = None
        self._hooks: list = []
        self._trainable: list = []
        self._shape = [0, 0]
        write_json_atomic(self.path, self.record)

    # ------------------------------------------------------------------ training begins: the weights are loaded
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        rss = self.record["rss"]
        rss["load_peak_bytes"] = self.rss.peak()
        return_free_heap()
        rss["after_load_bytes"] = current_rss()
        peft = hasattr(model, "get_nb_trainable_parameters")
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        adapters = {id(p) for p in self._trainable} if peft else set()
        base = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in adapters]
        self.record["tensors"] = {
            "weights_bytes": storage_bytes(base),
            "adapter_bytes": storage_bytes(p for p in self._trainable if id(p) in adapters),
            "trainable_parameters": sum(p.numel() for p in self._trainable),
            "total_parameters": sum(p.numel() for p in model.parameters()),
        }
        if torch.cuda.is_available():
            self.record["cuda"] = {"allocated_after_load_bytes": torch.cuda.memory_allocated()}
        write_json_atomic(self.path, self.record)

        self.tracker = LiveBytesTracker()
        self.tracker.phase = "setup"
        self.tracker.add_model(model, adapters)
        self._hooks.append(model.register_forward_hook(self._forward_done, with_kwargs=True))
        for param in self._trainable:
            self._hooks.append(param.register_post_accumulate_grad_hook(self._gradient_ready))
        self.rss.reset()
        self.tracker.__enter__()

    def _forward_done(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids") if kwargs else None
        if ids is None and args:
            ids = args[0]
        if hasattr(ids, "shape") and len(ids.shape) == 2:
            self._shape = [max(self._shape[0], int(ids.shape[0])), max(self._shape[1], int(ids.shape[1]))]
        if self.tracker is not None and self.tracker.phase == "forward":
            self.tracker.phase = "backward"

    def _gradient_ready(self, param):
        if self.tracker is not None and param.grad is not None:
            self.tracker.retag(param.grad.untyped_storage(), "gradients")

    # ------------------------------------------------------------------ the step's phases
    def on_step_begin(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.phase = "forward"

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        tensors = self.record["tensors"]
        tensors["gradient_bytes"] = max(tensors.get("gradient_bytes", 0),
                                        storage_bytes(p.grad for p in self._trainable if p.grad is not None))
        if self.tracker is not None:
            self.tracker.phase = "optimizer step"

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        states = [value for per_param in (optimizer.state.values() if optimizer is not None else [])
                  for value in per_param.values() if hasattr(value, "untyped_storage")]
        tensors = self.record["tensors"]
        tensors["optimizer_state_bytes"] = max(tensors.get("optimizer_state_bytes", 0), storage_bytes(states))
        if self.tracker is not None:
            for value in states:
                self.tracker.retag(value.untyped_storage(), "optimizer states")
            self.tracker.phase = "after the step"

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.phase = "between steps"
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False  # a measurement keeps figures, not a checkpoint
        return control

    # ------------------------------------------------------------------ training ends: write what was seen
    def on_train_end(self, args, state, control, **kwargs):
        import psutil
        import torch

        if self.tracker is None:
            return
        self.tracker.__exit__(None, None, None)
        for hook in self._hooks:
            hook.remove()
        tracker, self.tracker = self.tracker, None
        self.record["rss"]["train_peak_bytes"] = self.rss.peak()
        self.record["rss"]["source"] = self.rss.source
        self.record["live"] = {
            "peak_bytes": tracker.peak,
            "peak_phase": tracker.peak_phase,
            "peak_op": tracker.peak_op,
            "at_peak": tracker.peak_by_tag,
            "phase_peaks": tracker.phase_peaks,
            "rounding": tracker.round_to,
        }
        if torch.cuda.is_available():
            self.record.setdefault("cuda", {}).update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
                                                      max_reserved_bytes=torch.cuda.max_memory_reserved())
        times = psutil.Process().cpu_times()
        self.record["cpu_seconds"] = round(times.user + times.system, 1)  # the worker's, from its start to here
        self.record["batch_shape"] = self._shape
        self.record["steps"] = state.global_step
        self.record["finished_at"] = time.time()
        write_json_atomic(self.path, self.record)
