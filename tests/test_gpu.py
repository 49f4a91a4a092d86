"""The GPU sampler against a scripted NVML (this machine has no NVIDIA GPU) and, for the
fallback, against real processes' RAM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pynvml
import pytest

from engine.training.rundir import read_gpu_samples
from engine.training.sampler import GpuSampler, take_rss_sample, take_sample
from tests.fake_pynvml import NOT_AVAILABLE, FakeGpu, FakeNvml, FakeProcess, GiB

REPO = Path(__file__).resolve().parent.parent


def two_gpus() -> FakeNvml:
    nvml = FakeNvml(
        [
            FakeGpu(
                "NVIDIA A100-SXM4-80GB",
                total_bytes=80 * GiB,
                used_bytes=2 * GiB,
                util_percent=5,
                temp_c=35,
                power_mw=61_500,
            ),
            FakeGpu(
                "NVIDIA A100-SXM4-80GB",
                total_bytes=80 * GiB,
                used_bytes=1 * GiB,
                util_percent=0,
                temp_c=31,
                power_mw=55_000,
            ),
        ]
    )
    nvml.nvmlInit()
    return nvml


@pytest.fixture
def sleeper():
    """A real process (child of the test run) that NVML can 'list' and psutil can see."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_sample_reads_every_device_and_the_workers_share(sleeper):
    nvml = two_gpus()
    worker, other = sleeper.pid, os.getpid()
    nvml.gpus[0].processes = [FakeProcess(other, 1 * GiB)]
    nvml.gpus[1].processes = [FakeProcess(worker, 3 * GiB), FakeProcess(other, 512 * 2**20)]

    sample = take_sample(nvml, worker, now=123.0)

    assert sample["t"] == 123.0 and sample["source"] == "nvml" and sample["error"] is None
    assert [d["index"] for d in sample["devices"]] == [0, 1]
    first = sample["devices"][0]
    assert first["name"] == "NVIDIA A100-SXM4-80GB"
    assert (first["used_bytes"], first["total_bytes"]) == (2 * GiB, 80 * GiB)
    assert (first["util_percent"], first["temp_c"], first["power_w"]) == (5, 35, 61.5)
    assert [d["process_bytes"] for d in sample["devices"]] == [0, 3 * GiB]
    assert sample["process_bytes"] == 3 * GiB
    json.dumps(sample)  # goes into gpu.jsonl as is


def test_a_process_appearing_and_leaving_and_its_children_count():
    nvml = two_gpus()
    worker = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert take_sample(nvml, worker)["process_bytes"] == 0  # no CUDA context yet

        nvml.gpus[0].processes = [FakeProcess(worker, 1 * GiB), FakeProcess(child.pid, 2 * GiB)]
        assert take_sample(nvml, worker)["process_bytes"] == 3 * GiB  # a dataloader child counts

        nvml.gpus[0].processes = []
        assert take_sample(nvml, worker)["process_bytes"] == 0
        assert take_sample(nvml, None)["process_bytes"] is None  # between runs: nobody to measure
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("api", ["v3", "v2", "legacy"])
def test_every_process_api_version_gives_the_same_answer(api, sleeper):
    nvml = FakeNvml([FakeGpu("GPU", total_bytes=24 * GiB, used_bytes=5 * GiB)], process_api=api)
    nvml.nvmlInit()
    nvml.gpus[0].processes = [FakeProcess(sleeper.pid, 4 * GiB)]
    sample = take_sample(nvml, sleeper.pid)
    assert sample["error"] is None
    assert sample["process_bytes"] == 4 * GiB


@pytest.mark.parametrize("unavailable", [None, NOT_AVAILABLE, 81 * GiB])
def test_unavailable_process_memory_is_null_not_a_number(unavailable, sleeper):
    # None: pynvml's translation; NOT_AVAILABLE: an older wrapper passing the sentinel on;
    # more than the device holds: a struct read with the wrong layout.
    nvml = FakeNvml([FakeGpu("GPU", total_bytes=80 * GiB, used_bytes=5 * GiB)])
    nvml.nvmlInit()
    nvml.gpus[0].processes = [FakeProcess(sleeper.pid, unavailable)]
    sample = take_sample(nvml, sleeper.pid)
    assert sample["process_bytes"] is None
    assert sample["devices"][0]["used_bytes"] == 5 * GiB


def test_pids_from_another_namespace_make_the_share_unknown_not_zero(sleeper):
    nvml = FakeNvml([FakeGpu("GPU", total_bytes=80 * GiB, used_bytes=5 * GiB)])
    nvml.nvmlInit()
    missing = max(psutil.pids()) + 100_000  # a host PID this process cannot see
    assert not psutil.pid_exists(missing)
    nvml.gpus[0].processes = [FakeProcess(missing, 4 * GiB)]
    assert take_sample(nvml, sleeper.pid)["process_bytes"] is None


def test_one_failing_query_leaves_the_rest_of_the_sample(sleeper):
    nvml = two_gpus()
    nvml.failures["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN
    nvml.failures["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # normal: no error

    sample = take_sample(nvml, sleeper.pid)

    assert [d["power_w"] for d in sample["devices"]] == [None, None]
    assert [d["temp_c"] for d in sample["devices"]] == [None, None]
    assert [d["used_bytes"] for d in sample["devices"]] == [2 * GiB, 1 * GiB]
    assert sample["error"] == "GPU 0 power: Unknown Error; GPU 1 power: Unknown Error"


def test_a_runs_sampler_writes_its_history_and_the_dashboards_writes_nowhere(tmp_path, sleeper):
    nvml = two_gpus()
    dashboard = GpuSampler(interval_s=0.5, nvml_module=nvml)  # live device memory, no run
    assert dashboard.backend == "nvml"
    assert dashboard.latest() is None
    assert (
        dashboard.status_text()
        == "Reading GPU memory through NVML: 2 GPUs (NVIDIA A100-SXM4-80GB, NVIDIA A100-SXM4-80GB)."
    )
    dashboard.step()  # before the run: live device memory only

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    worker = GpuSampler(interval_s=0.5, nvml_module=nvml, run_dir=run_dir, pid=sleeper.pid)
    for used in (1, 2, 3):
        nvml.gpus[0].processes = [FakeProcess(sleeper.pid, used * GiB)]
        nvml.gpus[0].used_bytes = (2 + used) * GiB
        worker.step()
        dashboard.step()

    history = read_gpu_samples(run_dir)
    assert [s["process_bytes"] for s in history] == [1 * GiB, 2 * GiB, 3 * GiB]
    assert [s["devices"][0]["used_bytes"] for s in history] == [3 * GiB, 4 * GiB, 5 * GiB]
    assert len(worker.recent(60)) == 3
    assert len(dashboard.recent(60)) == 4
    assert [s["devices"][0]["used_bytes"] for s in dashboard.recent(60)] == [2 * GiB, 3 * GiB, 4 * GiB, 5 * GiB]
    assert all(s["process_bytes"] is None for s in dashboard.recent(60))  # it measures no process
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gpu.jsonl", "run"], "the dashboard wrote nothing"


def test_the_end_of_the_measured_process_ends_sampling_without_an_error_sample(tmp_path):
    nvml = two_gpus()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sampler = GpuSampler(interval_s=0.01, nvml_module=nvml, run_dir=tmp_path, pid=process.pid)
    with sampler:
        wait_for(lambda: len(read_gpu_samples(tmp_path)) >= 3)
        process.kill()  # not reaped yet: a zombie is an ended process too
        wait_for(lambda: sampler.finished)
        wait_for(lambda: not sampler._thread.is_alive())
    process.wait()
    written = read_gpu_samples(tmp_path)
    assert len(written) >= 3 and all(s["error"] is None for s in written)
    assert sampler.step() is None and len(read_gpu_samples(tmp_path)) == len(written)
    assert "problem" not in sampler.status_text()


def test_ring_buffer_is_bounded():
    sampler = GpuSampler(interval_s=1.0, nvml_module=two_gpus(), history_s=10)
    for _ in range(30):
        sampler.step()
    assert len(sampler.recent(3600)) == 11


def test_a_lost_gpu_is_recorded_and_nvml_started_again(tmp_path, sleeper):
    nvml = two_gpus()
    sampler = GpuSampler(interval_s=0.5, nvml_module=nvml, run_dir=tmp_path, pid=sleeper.pid)
    nvml.gpus[1].processes = [FakeProcess(sleeper.pid, 2 * GiB)]
    assert sampler.step()["error"] is None

    nvml.lose_gpu()
    lost = sampler.step()
    assert lost["devices"] == [] and lost["error"] == "device count: GPU is lost"
    assert "GPU is lost" in sampler.status_text() and "keeps trying" in sampler.status_text()
    still_lost = sampler.step()  # tries to initialise again, which fails too
    assert still_lost["error"].startswith("NVML could not start again: GPU is lost")

    nvml.recover()
    back = sampler.step()
    assert back["error"] is None and back["process_bytes"] == 2 * GiB
    assert nvml.init_calls >= 3  # the first start plus the retries

    written = read_gpu_samples(tmp_path)
    assert [bool(s["error"]) for s in written] == [False, True, True, False]


def test_the_thread_survives_errors_and_keeps_sampling(tmp_path, sleeper):
    nvml = two_gpus()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sampler = GpuSampler(interval_s=0.01, nvml_module=nvml, run_dir=run_dir, pid=sleeper.pid)
    with sampler:
        wait_for(lambda: len(read_gpu_samples(run_dir)) >= 3)
        nvml.lose_gpu()
        wait_for(lambda: (sampler.latest() or {}).get("error"))
        nvml.recover()
        wait_for(lambda: nvml.initialised and sampler.latest()["error"] is None)
        assert any(s["error"] for s in read_gpu_samples(run_dir))
        # A run directory that vanished mid-run: recorded, the thread goes on.
        shutil.rmtree(run_dir)
        count = len(sampler.recent(60))
        wait_for(lambda: len(sampler.recent(60)) > count + 2)
        assert "Could not write gpu.jsonl" in sampler.status_text()
        assert sampler._thread.is_alive()
    assert sampler._thread is None


def test_no_driver_falls_back_to_process_ram_with_a_reason():
    nvml = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    sampler = GpuSampler(nvml_module=nvml)
    assert sampler.backend == "process_rss"
    assert sampler.status_text() == (
        "No NVIDIA GPU found (NVML: Driver Not Loaded); showing the training process's RAM instead."
    )
    assert sampler.step()["source"] == "process_rss"


def test_zero_devices_also_falls_back():
    sampler = GpuSampler(nvml_module=FakeNvml([]))
    assert sampler.backend == "process_rss"
    assert "NVML lists no devices" in sampler.status_text()


ALLOCATOR = textwrap.dedent("""
    import subprocess, sys, time
    block = bytearray(80 * 2**20)          # touched, so resident
    for i in range(0, len(block), 4096): block[i] = 1
    if sys.argv[1] == "parent":
        child = subprocess.Popen([sys.executable, __file__, "child"])
    print("ready", flush=True)
    time.sleep(60)
    """)


def test_real_machine_without_nvidia_gpu_measures_the_worker_tree_ram(tmp_path):
    if GpuSampler(interval_s=0.05).backend == "nvml":  # the real pynvml: no driver on this machine
        pytest.skip("this machine has a working NVIDIA driver")
    script = tmp_path / "allocate.py"
    script.write_text(ALLOCATOR)
    worker = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        wait_for(lambda: len(psutil.Process(worker.pid).children()) == 1)
        child = psutil.Process(worker.pid).children()[0]
        wait_for(lambda: child.memory_info().rss > 80 * 2**20)

        sampler = GpuSampler(interval_s=0.05, run_dir=tmp_path, pid=worker.pid)
        assert sampler.status_text().startswith("No NVIDIA GPU found (NVML: ")
        sample = sampler.step()
        assert sample["source"] == "process_rss" and sample["devices"] == [] and sample["error"] is None
        # 80 MiB in each of two processes: only the sum over the tree gets past 160 MiB.
        assert sample["process_bytes"] > 160 * 2**20
        assert psutil.Process(worker.pid).memory_info().rss < 160 * 2**20
        assert read_gpu_samples(tmp_path) == [sample]
    finally:
        for proc in psutil.Process(worker.pid).children(recursive=True):
            proc.kill()
        worker.kill()
        worker.wait()
    assert take_rss_sample(worker.pid)["error"] == f"process {worker.pid} has exited"
    assert sampler.step() is None and sampler.finished  # the end of the worker is not a failed reading
    assert read_gpu_samples(tmp_path) == [sample]


def test_rss_sample_without_a_worker_is_empty():
    sample = take_rss_sample(None, now=5.0)
    assert sample == {"t": 5.0, "source": "process_rss", "devices": [], "process_bytes": None, "error": None}


def test_importing_the_sampler_does_not_import_torch():
    code = "import sys, engine.training.sampler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
