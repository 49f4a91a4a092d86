"""Live tensor bytes: what a process really holds in tensors, on any device, op by op.

``torch.cuda.max_memory_allocated`` only exists on CUDA. :class:`LiveBytesTracker` gives
the same figure anywhere (the CPU included), and says what the bytes at the peak were:
each storage is tagged when it appears (``weights``, ``adapters``, or the phase it was
born in: ``forward``, ``backward``, ``optimizer``...), and a storage can be re-tagged later
(a gradient, once autograd has accumulated it). The measured comparison
(``engine.memory.probe``), the estimator's tests and ``bench/memory_accuracy.py`` use it.

torch is imported inside the methods; importing this module costs nothing.
"""

from __future__ import annotations

import weakref


class LiveBytesTracker:
    """A stand-in for ``torch.cuda.max_memory_allocated`` on any device.

    A dispatch mode sees every tensor an op creates; a weak reference on each storage
    tells when it is freed. Sizes are rounded up to 512 bytes as the CUDA caching
    allocator does, so the peak is comparable with the estimator's ``peak_allocated_bytes``
    (minus the library workspaces, which only exist on CUDA).

    Hand-written rather than ``torch.profiler``'s memory timeline: the profiler keeps every
    event until the end (minutes of training), while this keeps one integer per tag and
    the breakdown at the peak.
    """

    def __init__(self, round_to: int = 512):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out, str(func))
                return out

        self._mode = _Mode()
        self.round_to = round_to
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self.phase = ""
        self.peak_phase = ""
        self.live_by_tag: dict[str, int] = {}
        self.peak_by_tag: dict[str, int] = {}  # the live bytes of each tag at the moment of the peak
        self.phase_peaks: dict[str, int] = {}  # the highest live bytes seen during each phase
        self._refs: dict[int, tuple[object, int, str]] = {}

    def _size(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to if self.round_to else n

    def add_storage(self, storage, op: str = "", tag: str | None = None) -> None:
        key = id(storage)
        if key in self._refs or storage.nbytes() == 0 or storage.device.type == "meta":
            return
        size = self._size(storage)
        tag = tag or self.phase or "other"

        def freed(_ref, key=key):
            entry = self._refs.pop(key, None)
            if entry is not None:
                self.live -= entry[1]
                self.live_by_tag[entry[2]] -= entry[1]

        self._refs[key] = (weakref.ref(storage, freed), size, tag)
        self.live += size
        self.live_by_tag[tag] = self.live_by_tag.get(tag, 0) + size
        if self.phase and self.live > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.live
        if self.live > self.peak:
            self.peak, self.peak_op, self.peak_phase = self.live, op, self.phase
            self.peak_by_tag = {name: value for name, value in self.live_by_tag.items() if value}

    def retag(self, storage, tag: str) -> None:
        """Count a storage already tracked under another tag from now on (e.g. a gradient)."""
        entry = self._refs.get(id(storage))
        if entry is None or entry[2] == tag:
            return
        ref, size, old = entry
        self._refs[id(storage)] = (ref, size, tag)
        self.live_by_tag[old] -= size
        self.live_by_tag[tag] = self.live_by_tag.get(tag, 0) + size

    def _track(self, out, op: str) -> None:
        import torch

        items = out if isinstance(out, (tuple, list)) else [out]
        for item in items:
            if isinstance(item, torch.Tensor):
                self.add_storage(item.untyped_storage(), op)
            elif isinstance(item, (tuple, list)):  # foreach ops return lists of tensors
                self._track(item, op)

    def add_model(self, model, adapters: set[int] | None = None) -> None:
        """Count what exists before tracking starts: parameters, buffers, quantization state.

        Parameters whose ``id`` is in ``adapters`` are tagged ``adapters``, everything else ``weights``.
        """
        adapters = adapters or set()
        for tensor in list(model.parameters()) + list(model.buffers()):
            tag = "adapters" if id(tensor) in adapters else "weights"
            self.add_storage(tensor.untyped_storage(), "model", tag)
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                for value in state.as_dict(packed=False).values():
                    if hasattr(value, "untyped_storage"):
                        self.add_storage(value.untyped_storage(), "model", "weights")

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once).

    A bitsandbytes 4-bit weight also holds its quantization state (absmax, code book, the
    nested constants of double quantization); those count too.
    """
    seen: dict[int, int] = {}

    def add(tensor) -> None:
        if tensor is None or not hasattr(tensor, "untyped_storage") or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()

    for tensor in tensors:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=False).values():
                add(value)
    return sum(seen.values())
