"""The command line: the same run directories as the dashboard, errors as sentences."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.training import rundir
from tests.conftest import PROJECT_ROOT


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_train_from_the_cli_writes_a_normal_run_directory(tmp_path, demo_model_dir):
    result = cli("train", "demo-qlora", "--set", "train.max_steps=3", "--set", "train.eval_steps=3",
                 "--name", "cli-run", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run cli-run: completed" in result.stdout
    assert "note: No CUDA GPU found" in result.stdout  # fallbacks are said at the end
    status = rundir.read_status(tmp_path / "cli-run")
    assert status["state"] == "completed" and status["step"] == 3
    listed = json.loads(cli("runs", "--json", "--runs-dir", str(tmp_path)).stdout)
    assert [row["name"] for row in listed] == ["cli-run"] and listed[0]["method"] == "qlora"

    # No dashboard was running, yet the run has its memory history: the worker samples itself.
    samples = rundir.read_gpu_samples(tmp_path / "cli-run")
    assert len(samples) >= 3, "one sample a second for the whole run"
    assert all(s["source"] in ("nvml", "process_rss") and s["error"] is None for s in samples)
    assert all(s["process_bytes"] > 0 for s in samples)
    assert max(s["process_bytes"] for s in samples) > 200 * 2**20, "the worker with torch and the model loaded"
    times = [s["t"] for s in samples]
    assert times == sorted(times) and status["worker_started_at"] <= times[0] and times[-1] <= status["ended_at"]
    assert listed[0]["peak memory (MiB)"] > 200


def test_cli_errors_are_sentences_not_tracebacks(tmp_path):
    result = cli("train", "demo-lora", "--set", "lora.r=-3", "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert "lora.r: rank must be a positive integer, got -3" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("stop", "no-such-run", "--runs-dir", str(tmp_path))
    assert result.returncode == 2 and "No run named 'no-such-run'" in result.stderr
    result = cli("train", "no-such-preset", "--runs-dir", str(tmp_path))
    assert result.returncode == 2 and "no such preset" in result.stderr
    assert list(tmp_path.iterdir()) == [], "a refused config creates no run directory"
