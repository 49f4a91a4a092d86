"""Memory sampler: NVML device readings, or the training process's RAM without a GPU.

Two users, one class. The training worker runs a ``GpuSampler(run_dir=..., pid=os.getpid())``
on a thread for its whole life and appends every sample to the run's ``gpu.jsonl``, so a
run has a memory history however it was started (dashboard, ``python -m engine train``, a
test). NVML reads the driver's counters without creating a CUDA context, so sampling from
a thread of the worker costs no VRAM and never touches torch. The dashboard runs one with
no run: it shows live device memory between runs and writes nowhere, so two dashboards
watching one run never double its samples.

Every sample is one JSON object; in a run each is appended as a line of ``gpu.jsonl``::

    {"t": 1718000000.5,                  # unix time, seconds
     "source": "nvml" | "process_rss",   # where the numbers come from (see below)
     "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                  "used_bytes": int|null, "total_bytes": int|null,
                  "util_percent": int|null, "temp_c": int|null, "power_w": float|null,
                  "process_bytes": int|null}],  # the worker's share of this device
     "process_bytes": int|null,          # the worker's memory, children included
     "error": str|null}                  # what could not be read this time, if anything

``source == "nvml"``: device readings from NVML; ``process_bytes`` is the VRAM held by
the worker and its child processes, summed over devices. It is null without a process to
measure (the dashboard's sampler), when NVML cannot report it (Windows WDDM), or when NVML
lists PIDs this process cannot see (a container with its own PID namespace), and 0 when
the worker holds no GPU memory yet.

``source == "process_rss"``: there is no usable NVIDIA GPU, ``devices`` is empty and
``process_bytes`` is the resident set size of the worker plus its children. RSS is a sum
over processes, so pages shared after ``fork`` count once per process: an upper bound.

A value that could not be read is null; ``engine.training.rundir.read_gpu_samples`` reads the file
back. NVML ignores ``CUDA_VISIBLE_DEVICES``: every device of the machine is listed.

When the measured process has ended, the sampler stops: the end of a run is not a failed
reading, so no sample is recorded for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

SOURCE_NVML = "nvml"
SOURCE_RSS = "process_rss"

# pynvml's sentinel for "not available" in 64-bit fields (older wrappers pass it through).
_NOT_AVAILABLE_U64 = 2**64 - 1

# Error codes (values from nvml.h) after which NVML has to be shut down and initialised
# again before it can answer; looked up on the module first, these are the fallbacks.
_REINIT_ERRORS = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_RESET_REQUIRED": 16,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
}
_NOT_SUPPORTED = ("NVML_ERROR_NOT_SUPPORTED", 3)
_FUNCTION_NOT_FOUND = ("NVML_ERROR_FUNCTION_NOT_FOUND", 13)


# --------------------------------------------------------------------------- one sample


def take_sample(nvml: Any, pid: int | None, now: float | None = None) -> dict:
    """Read every device once through an initialised ``nvml`` module.

    Never raises for an NVML failure: what could not be read is null and the reason goes
    into the sample's ``error``, so one bad query never costs the whole sample.
    """
    return _read_nvml(nvml, pid, now)[0]


def take_rss_sample(pid: int | None, now: float | None = None) -> dict:
    """The no-GPU fallback: resident memory of ``pid`` and all its descendants."""
    sample = _empty_sample(SOURCE_RSS, now)
    if pid is None:
        return sample
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        if root.status() == psutil.STATUS_ZOMBIE:
            raise psutil.ZombieProcess(pid)
    except psutil.NoSuchProcess:  # ZombieProcess included: it has exited, only not reaped
        sample["error"] = f"process {pid} has exited"
        return sample
    except psutil.AccessDenied:
        sample["error"] = f"not allowed to read the memory of process {pid}"
        return sample
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # a child that ended between listing and reading holds nothing now
        except psutil.AccessDenied:
            sample["error"] = f"not allowed to read the memory of child process {proc.pid}"
    sample["process_bytes"] = total
    return sample


def _empty_sample(source: str, now: float | None) -> dict:
    return {
        "t": time.time() if now is None else now,
        "source": source,
        "devices": [],
        "process_bytes": None,
        "error": None,
    }


def _read_nvml(nvml: Any, pid: int | None, now: float | None) -> tuple[dict, bool]:
    """Return the sample and whether NVML has to be initialised again before the next one."""
    sample = _empty_sample(SOURCE_NVML, now)
    errors: list[str] = []
    needs_reinit = False

    def query(what: str, fn, *args):
        nonlocal needs_reinit
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - one failed query must not cost the whole sample
            if _is_error(nvml, exc, *_NOT_SUPPORTED):
                return None  # normal on some boards (MIG slices, no power sensor)
            needs_reinit = needs_reinit or _needs_reinit(nvml, exc)
            errors.append(f"{what}: {describe_error(exc)}")
            return None

    count = query("device count", nvml.nvmlDeviceGetCount)
    worker_pids = _process_tree(pid) if pid is not None else set()
    shares: list[int | None] = []
    for index in range(count or 0):
        handle = query(f"GPU {index}", nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        name = query(f"GPU {index} name", nvml.nvmlDeviceGetName, handle)
        memory = query(f"GPU {index} memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        util = query(f"GPU {index} utilisation", nvml.nvmlDeviceGetUtilizationRates, handle)
        temp = query(f"GPU {index} temperature", _temperature, nvml, handle)
        power_mw = query(f"GPU {index} power", nvml.nvmlDeviceGetPowerUsage, handle)
        total = _int_or_none(getattr(memory, "total", None))
        device = {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "used_bytes": _int_or_none(getattr(memory, "used", None)),
            "total_bytes": total,
            "util_percent": _int_or_none(getattr(util, "gpu", None)),
            "temp_c": _int_or_none(temp),
            "power_w": power_mw / 1000.0 if isinstance(power_mw, (int, float)) else None,
            "process_bytes": None,
        }
        if pid is not None:
            procs = query(f"GPU {index} processes", _compute_processes, nvml, handle)
            if procs is not None:
                device["process_bytes"] = _worker_share(procs, worker_pids, total)
            shares.append(device["process_bytes"])
        sample["devices"].append(device)

    if pid is not None:
        sample["process_bytes"] = _sum_shares(shares)
    sample["error"] = "; ".join(errors) or None
    return sample, needs_reinit


def _temperature(nvml: Any, handle: Any) -> int:
    sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    # nvmlDeviceGetTemperature is deprecated in newer NVML; the V form is missing in older.
    last: Exception | None = None
    for name in ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"):
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        try:
            return fn(handle, sensor)
        except Exception as exc:
            if not _is_error(nvml, exc, *_FUNCTION_NOT_FOUND):
                raise
            last = exc
    raise last or AttributeError("this pynvml has no temperature query")


def _compute_processes(nvml: Any, handle: Any) -> list:
    """Processes holding a CUDA context on the device, whichever API version the driver has.

    pynvml's unversioned call uses the v3 struct and fails on drivers older than it, and
    older pynvml releases have no ``_v3``: try the newest first and step down.
    """
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    last: Exception | None = None
    for name in (
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetComputeRunningProcesses",
    ):
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        try:
            return list(fn(handle))
        except Exception as exc:
            if not (_is_error(nvml, exc, *_FUNCTION_NOT_FOUND) or (mismatch and isinstance(exc, mismatch))):
                raise
            last = exc
    raise last or AttributeError("this pynvml has no process query")


def _worker_share(procs: list, worker_pids: set[int], total: int | None) -> int | None:
    """VRAM the worker's processes hold on one device, or None when NVML cannot say."""
    found = known = unknown_pid = False
    used_sum = 0
    for proc in procs:
        proc_pid = getattr(proc, "pid", None)
        used = getattr(proc, "usedGpuMemory", None)
        # Not available: None from pynvml, the raw sentinel from older wrappers, or a
        # value larger than the whole device (a v2/v3 struct read with the wrong layout).
        if used is not None and (used == _NOT_AVAILABLE_U64 or (total is not None and used > total)):
            used = None
        if proc_pid in worker_pids:
            found = True
            if used is not None:
                known = True
                used_sum += int(used)
        elif proc_pid is None or not psutil.pid_exists(proc_pid):
            unknown_pid = True
    if found:
        return used_sum if known else None
    # Not listed: it holds nothing here, unless NVML reports PIDs from another namespace.
    return None if unknown_pid else 0


def _sum_shares(shares: list[int | None]) -> int | None:
    known = [s for s in shares if s is not None]
    if not known:
        return None
    if len(known) < len(shares) and not any(known):
        return None  # zeros where we could tell, unknown elsewhere: the honest total is unknown
    return sum(known)


def _has_exited(pid: int) -> bool:
    """Gone, or a zombie (exited, only not yet reaped by its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # alive, only not ours to inspect


def _process_tree(pid: int) -> set[int]:
    pids = {pid}
    try:
        pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        pass  # gone or not ours to inspect: match the PID alone
    return pids


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _is_error(nvml: Any, exc: Exception, const_name: str, default_code: int) -> bool:
    return getattr(exc, "value", None) == getattr(nvml, const_name, default_code) and isinstance(
        exc, getattr(nvml, "NVMLError", Exception)
    )


def _needs_reinit(nvml: Any, exc: Exception) -> bool:
    return any(_is_error(nvml, exc, name, code) for name, code in _REINIT_ERRORS.items())


def describe_error(exc: BaseException) -> str:
    """NVML errors read well as they are ("GPU is lost"); others get their type in front."""
    nvml_error = type(exc).__name__.startswith("NVMLError")
    return str(exc) if nvml_error and str(exc) else f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- the sampler


class GpuSampler:
    """Samples memory every ``interval_s`` on a daemon thread; keeps ``history_s`` in memory.

    With ``run_dir``, every sample is also appended to ``run_dir/gpu.jsonl`` (a failed append is
    passed to ``on_write_error``); with ``pid``, each sample measures that process and its
    children, and sampling ends when it exits.
    ``step()`` takes one sample synchronously (what the thread does each tick), which
    lets tests step deterministically without starting the thread.
    """

    def __init__(self, interval_s: float = 1.0, nvml_module: Any = None, history_s: float = 900.0,
                 run_dir: Path | None = None, pid: int | None = None, on_write_error=None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.pid = int(pid) if pid is not None else None
        self.finished = False  # the measured process has exited; nothing more to sample
        self._nvml_override = nvml_module
        self._nvml: Any = None
        self._backend: str | None = None
        self._fallback_reason = ""
        self._nvml_ready = False
        self._device_names: list[str] = []
        self._backend_lock = threading.Lock()  # detection and NVML (re)initialisation
        self._lock = threading.Lock()  # samples and the write error
        self._samples: deque[dict] = deque(maxlen=max(2, int(history_s / interval_s) + 1))
        self._write_error: str | None = None
        self._on_write_error = on_write_error  # called with the OSError when gpu.jsonl cannot be appended
        self._logged_error: str | None = None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._backend_lock:
            if self._nvml_ready:
                self._shutdown_nvml()

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ readings
    @property
    def backend(self) -> str:
        """ "nvml" or "process_rss" (detected on first use)."""
        self._detect_backend()
        return self._backend  # type: ignore[return-value]

    def latest(self) -> dict | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def recent(self, seconds: float) -> list[dict]:
        """Samples of the last ``seconds`` from the in-memory ring buffer, oldest first."""
        since = time.time() - seconds
        with self._lock:
            return [s for s in self._samples if s["t"] >= since]

    def status_text(self) -> str:
        """One sentence for the UI about where the memory numbers come from."""
        backend = self.backend
        if backend == SOURCE_RSS:
            text = (
                f"No NVIDIA GPU found ({self._fallback_reason}); showing the training process's RAM instead."
            )
        else:
            count = len(self._device_names)
            names = ", ".join(self._device_names)
            text = f"Reading GPU memory through NVML: {count} GPU{'s' if count != 1 else ''} ({names})."
        latest = self.latest()
        if latest is not None and latest.get("error"):
            text += f" The last reading had a problem ({latest['error']}); the sampler keeps trying."
        with self._lock:
            write_error = self._write_error
        if write_error:
            text += f" Could not write gpu.jsonl: {write_error}."
        return text

    def step(self) -> dict | None:
        """Take one sample, keep it in memory and, for a run, append it to gpu.jsonl.

        None once the measured process has exited: the sampler is finished, not failing.
        """
        if self.finished or (self.pid is not None and _has_exited(self.pid)):
            self.finished = True
            self._stop_event.set()
            return None
        sample = self._take(self.pid)
        if self.pid is not None and sample.get("error") and _has_exited(self.pid):
            self.finished = True  # it ended while being read: that is the end, not an error
            self._stop_event.set()
            return None
        with self._lock:
            self._samples.append(sample)
        if self.run_dir is not None:
            self._append(self.run_dir / "gpu.jsonl", sample)
        self._log_error_once(sample.get("error"))
        return sample

    # ------------------------------------------------------------------ internals
    def _loop(self) -> None:
        while not self._stop_event.is_set():
            began = time.monotonic()
            try:
                self.step()
            except Exception:  # the thread must outlive any bug in one tick
                log.exception("GPU sampler tick failed; continuing")
            self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def _take(self, pid: int | None) -> dict:
        self._detect_backend()
        if self._backend == SOURCE_RSS:
            return take_rss_sample(pid)
        with self._backend_lock:
            if not self._nvml_ready:
                try:
                    self._nvml.nvmlInit()
                    self._nvml_ready = True
                except Exception as exc:  # noqa: BLE001 - NVML bindings raise many types; the sampler says why and goes on
                    sample = _empty_sample(SOURCE_NVML, None)
                    sample["error"] = f"NVML could not start again: {describe_error(exc)}"
                    return sample
            nvml = self._nvml
        sample, needs_reinit = _read_nvml(nvml, pid, None)
        if needs_reinit:
            with self._backend_lock:
                self._shutdown_nvml()
        return sample

    def _detect_backend(self) -> None:
        with self._backend_lock:
            if self._backend is not None:
                return
            nvml = self._nvml_override
            if nvml is None:
                try:
                    # nvidia-ml-py; imported late so a missing package only means "no GPU".
                    import pynvml as nvml
                except ImportError:
                    self._use_rss("pynvml is not installed")
                    return
            try:
                nvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - NVML bindings raise many types; the sampler says why and goes on
                self._use_rss(f"NVML: {describe_error(exc)}")
                return
            self._nvml, self._nvml_ready = nvml, True
            try:
                count = nvml.nvmlDeviceGetCount()
                names = []
                for index in range(count):
                    name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
                    names.append(name.decode() if isinstance(name, bytes) else str(name))
            except Exception as exc:  # noqa: BLE001 - NVML bindings raise many types; the sampler says why and goes on
                self._shutdown_nvml()
                self._use_rss(f"NVML: {describe_error(exc)}")
                return
            if count == 0:
                self._shutdown_nvml()
                self._use_rss("NVML lists no devices")
                return
            self._device_names = names
            self._backend = SOURCE_NVML

    def _use_rss(self, reason: str) -> None:
        self._backend = SOURCE_RSS
        self._fallback_reason = reason
        self._nvml = None
        log.info("No NVIDIA GPU found (%s); sampling the training process's RAM instead.", reason)

    def _shutdown_nvml(self) -> None:
        self._nvml_ready = False
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - NVML bindings raise many types; the sampler says why and goes on
            pass  # already gone (GPU lost, driver unloaded): initialising again is what matters

    def _append(self, path: Path, sample: dict) -> None:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(sample) + "\n")
        except OSError as exc:
            with self._lock:
                self._write_error = f"{path}: {exc.strerror or exc}"
            if self._on_write_error is not None:
                self._on_write_error(exc)  # the worker fails the run on a full disk, in words

    def _log_error_once(self, error: str | None) -> None:
        # At one sample a second, a persistent error would flood the log.
        if error and error != self._logged_error:
            log.warning("GPU sampler: %s", error)
        self._logged_error = error
