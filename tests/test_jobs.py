"""The job manager with real worker processes: queue, graceful stop, resume, kill -9, restart recovery, bad input."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.config import load_preset
from engine.training import rundir
from engine.training.jobs import JobManager, wait_for_state
from tests.conftest import wait_until

FAST = ["train.max_steps=24", "train.logging_steps=1", "train.save_steps=6", "train.eval_steps=12",
        "train.per_device_train_batch_size=8"]


@pytest.fixture()
def manager(tmp_path, demo_model_dir):
    jobs = JobManager(tmp_path / "runs", poll_s=0.2).start()
    yield jobs
    if jobs.active:
        try:
            os.killpg(jobs.active.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    jobs.shutdown()


def test_queue_stop_resume(manager):
    first = manager.submit(load_preset("demo-lora", FAST), name="first")
    second = manager.submit(load_preset("demo-lora", FAST + ["train.max_steps=2"]), name="second")
    assert manager.active_name() == "first" and manager.queue_names() == ["second"]
    assert rundir.read_status(second)["state"] == "queued"
    assert "position 1" in rundir.read_status(second)["message"]

    # Graceful stop once a checkpoint exists: finish the step, save adapter + checkpoint, exit.
    assert wait_until(lambda: rundir.latest_checkpoint(first) is not None, 240), rundir.log_tail(first)
    assert manager.stop("first") == "requested"
    asked = time.time()
    assert wait_for_state(first, {"stopped", "failed", "completed"}, 60) == "stopped", rundir.log_tail(first)
    stopped_status = rundir.read_status(first)
    print(f"stop took {stopped_status['ended_at'] - asked:.1f} s after the request")
    assert stopped_status["ended_at"] - asked < 30
    stopped_at = stopped_status["step"]
    assert 0 < stopped_at < 24
    assert (rundir.RunPaths(first).adapter / "adapter_model.safetensors").exists()
    assert rundir.latest_checkpoint(first).name == f"checkpoint-{stopped_at}"

    # The queued run starts by itself once the first one is done.
    assert wait_for_state(second, {"completed", "failed"}, 240) == "completed", rundir.log_tail(second)

    # Resume continues from the checkpoint into the same directory.
    manager.resume("first")
    assert wait_for_state(first, {"completed", "failed"}, 240) == "completed", rundir.log_tail(first)
    steps = [m["step"] for m in rundir.read_metrics(first) if m["event"] == "log"]
    assert steps == sorted(steps), "no step is trained twice after resume"
    assert steps[-1] == 24 and any(s > stopped_at for s in steps)
    assert f"resuming from checkpoint-{stopped_at}" in rundir.RunPaths(first).log.read_text()
    # The task metric (the demo preset's json_equal) keeps being measured after the resume.
    task_steps = [m["step"] for m in rundir.read_metrics(first) if m["event"] == "task_eval"]
    assert task_steps[0] == 0 and task_steps[-1] == 24 and 12 in task_steps


def test_kill_9_is_reported_and_the_manager_survives(manager):
    run_dir = manager.submit(load_preset("demo-lora", FAST + ["train.max_steps=400"]), name="victim")
    assert wait_until(lambda: rundir.read_status(run_dir).get("step", 0) >= 2, 240), rundir.log_tail(run_dir)
    os.kill(manager.active.pid, signal.SIGKILL)
    assert wait_for_state(run_dir, {"failed"}, 20) == "failed"
    error = rundir.read_status(run_dir)["error"]
    assert "SIGKILL" in error and "step" in error
    assert manager.active is None
    # Still usable: the next run is accepted and queued/started.
    nxt = manager.submit(load_preset("demo-lora", FAST + ["train.max_steps=1"]), name="after")
    assert wait_for_state(nxt, {"completed", "failed"}, 240) == "completed"


def test_restart_marks_dead_workers_interrupted_and_requeues(tmp_path):
    runs_dir = tmp_path / "runs"
    dead = rundir.create_run(runs_dir, load_preset("demo-lora"), name="dead")
    rundir.update_status(dead, "training", pid=2**22 + 7, step=5)  # no such process
    waiting = rundir.create_run(runs_dir, load_preset("demo-lora"), name="waiting")
    manager = JobManager(runs_dir, recover=False)
    manager.recover()
    assert rundir.read_status(dead)["state"] == "interrupted"
    assert "last step 5" in rundir.read_status(dead)["error"]
    assert manager.queue_names() == ["waiting"]
    assert rundir.read_status(waiting)["state"] == "queued"


def test_bad_inputs_fail_in_words_within_seconds(tmp_path, demo_model_dir):
    manager = JobManager(tmp_path / "runs", poll_s=0.2).start()
    try:
        cases = {
            "missing-folder": (["model.name_or_path=/no/such/model"], "not an existing local path"),
            "offline-hub-id": (["model.name_or_path=someone/some-model"], "hub"),
            "bad-target": (["lora.target_modules=q_proj,qkv_fused"], "qkv_fused not found in this model"),
            "missing-data": (["data.path=/no/such/data.jsonl"], "data.jsonl"),
        }
        for name, (overrides, words) in cases.items():
            started = time.time()
            run_dir = manager.submit(load_preset("demo-lora", overrides), name=name)
            assert wait_for_state(run_dir, {"failed", "completed"}, 120) == "failed", rundir.log_tail(run_dir)
            error = rundir.read_status(run_dir)["error"]
            assert words in error, error
            assert "Traceback" not in error
            print(f"{name}: failed in {time.time() - started:.1f} s: {error}")
    finally:
        manager.shutdown()
