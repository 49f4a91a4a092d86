"""A scripted stand-in for the ``pynvml`` module: the test machine has no NVIDIA driver.

Only the device readings are fake. Constants and exception classes are the real
pynvml ones, so the code under test meets exactly the errors it would meet on a GPU
machine (``NVMLError_GpuIsLost``, ``NVMLLibraryMismatchError``...).

Script it by changing its state between samples::

    nvml = FakeNvml([FakeGpu("NVIDIA A100", total_bytes=80 * GiB, used_bytes=GiB)])
    nvml.gpus[0].processes = [FakeProcess(pid, 3 * GiB)]   # a process appears
    nvml.failures["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN  # a query fails
    nvml.lose_gpu(); ...; nvml.recover()                      # the GPU falls off the bus
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml as _real

GiB = 2**30
NOT_AVAILABLE = _real.NVML_VALUE_NOT_AVAILABLE_ulonglong.value


@dataclass
class FakeProcess:
    pid: int
    used_bytes: int | None  # None or NOT_AVAILABLE: the driver cannot say (Windows WDDM)


@dataclass
class FakeGpu:
    name: str
    total_bytes: int
    used_bytes: int
    util_percent: int = 0
    temp_c: int = 40
    power_mw: int = 100_000
    processes: list[FakeProcess] = field(default_factory=list)


class FakeNvml:
    """Module-like object with the pynvml functions the sampler calls.

    ``process_api`` picks what the "driver" offers for listing processes:
    "v3" (everything), "v2" (``_v3`` missing in the driver, unversioned call raises
    ``NVMLLibraryMismatchError`` as pynvml does), "legacy" (an old pynvml with only the
    unversioned call, returning v1 structs without instance ids).
    """

    NVMLError = _real.NVMLError
    NVMLLibraryMismatchError = _real.NVMLLibraryMismatchError

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None, process_api: str = "v3"):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.process_api = process_api
        self.failures: dict[str, int] = {}  # function name -> NVML error code raised on every call
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self._lost = False
        if process_api == "legacy":
            self.nvmlDeviceGetComputeRunningProcesses_v3 = None
            self.nvmlDeviceGetComputeRunningProcesses_v2 = None

    def __getattr__(self, name: str):
        if name.startswith(("NVML_", "NVMLError_")):
            return getattr(_real, name)
        raise AttributeError(name)

    # -------------------------------------------------------------- scripting helpers
    def lose_gpu(self) -> None:
        """Every device call fails with GPU_IS_LOST until ``recover()``."""
        self._lost = True

    def recover(self) -> None:
        """The GPU is back, but the old NVML session is dead: calls need a fresh nvmlInit."""
        self._lost = False
        self.initialised = False

    def _check(self, function: str) -> None:
        if function in self.failures:
            raise _real.NVMLError(self.failures[function])
        if self._lost:
            raise _real.NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
        if not self.initialised:
            raise _real.NVMLError(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, function: str, handle) -> FakeGpu:
        self._check(function)
        return self.gpus[handle.index]

    # -------------------------------------------------------------- the pynvml surface
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise _real.NVMLError(self.init_error)
        if self._lost:
            raise _real.NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int):
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise _real.NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(
            total=gpu.total_bytes, used=gpu.used_bytes, free=gpu.total_bytes - gpu.used_bytes
        )

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._gpu("nvmlDeviceGetUtilizationRates", handle).util_percent, memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:
        assert sensor == _real.NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperature", handle).temp_c

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw  # milliwatts, as NVML reports

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle):
        if self.process_api != "v3":
            raise _real.NVMLError(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle, instance_ids=True)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle, instance_ids=True)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.process_api == "v2":
            raise _real.NVMLLibraryMismatchError("unversioned call does not match the NVML library")
        return self._processes(
            "nvmlDeviceGetComputeRunningProcesses", handle, instance_ids=self.process_api == "v3"
        )

    def _processes(self, function: str, handle, instance_ids: bool) -> list:
        gpu = self._gpu(function, handle)
        infos = []
        for proc in gpu.processes:
            info = SimpleNamespace(pid=proc.pid, usedGpuMemory=proc.used_bytes)
            if instance_ids:  # v2/v3 structs; the v1 struct has only pid and usedGpuMemory
                info.gpuInstanceId = info.computeInstanceId = 0xFFFFFFFF
            infos.append(info)
        return infos
