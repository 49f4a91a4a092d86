"""The run directory on its own: creating runs, names, the two status writers and their merged
view, concurrent writers, incremental reading, and adapter and checkpoint discovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.config import load_preset
from engine.errors import LoraLabError, RunError
from engine.names import check_name, name_problem
from engine.training import rundir
from engine.training.rundir import RunPaths, read_run_status, update_launch, update_status
from tests.conftest import PROJECT_ROOT


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run whose worker these tests play: they hold its worker.lock, so readers see a live worker."""
    run_dir = rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name="r")
    with rundir.hold_worker_lock(run_dir):
        yield run_dir


# ----------------------------------------------------------------------------- creating and naming
def test_create_run_writes_the_config_and_a_queued_status(tmp_path):
    before = time.time()
    run_dir = rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name="first")
    assert run_dir == tmp_path / "runs" / "first"
    assert rundir.load_config(run_dir).name == "first"
    status = read_run_status(run_dir)
    assert (status.state, status.message) == ("queued", "Waiting to start.")
    assert before <= status.created_at <= time.time()
    assert [h["state"] for h in status.history] == ["queued"]
    assert status.started_at is None and status.ended_at is None
    # A second run of the same name gets its own folder; nothing is overwritten.
    again = rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name="first")
    assert again.name == "first-2" and rundir.load_config(again).name == "first-2"
    assert rundir.resolve_run(tmp_path / "runs", "first-2") == again
    with pytest.raises(RunError, match="No run named 'third'"):
        rundir.resolve_run(tmp_path / "runs", "third")


@pytest.mark.parametrize("name, why", [
    ("", "it is empty"),
    ("../outside", "it contains '..'"),
    ("a/b", "it contains a path separator"),
    ("a\\b", "it contains a path separator"),
    ("C:evil", "it is an absolute path"),
    (".hidden", "not starting with '.'"),
    ("x" * 101, "up to 100 characters"),
    ("tab\tname", "only letters, digits"),
    ("newline\n", "only letters, digits"),
])
def test_a_bad_name_is_refused_in_words_before_any_folder_exists(tmp_path, name, why):
    assert why in name_problem(name)
    with pytest.raises(RunError) as caught:
        rundir.safe_run_dir(tmp_path / "runs", name)
    assert str(caught.value).startswith(f"'{name}' is not a valid run name: ")
    assert why in str(caught.value)
    if name:  # an empty name asks create_run for a generated one
        with pytest.raises(RunError, match="is not a valid run name"):
            rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name=name)
        assert not any((tmp_path / "runs").iterdir())


def test_good_names_pass_the_one_rule():
    for name in ("run-1", "a.b_c", "_x", "x" * 100, "2026-01-01-lora"):
        assert name_problem(name) is None
        assert check_name(name, "run") == name
    with pytest.raises(LoraLabError, match="'a/b' is not a valid export name: it contains a path separator."):
        check_name("a/b", "export")


# ----------------------------------------------------------------------------- the two writers, one view
def test_the_worker_and_the_launcher_each_write_their_own_file(run_dir):
    paths = RunPaths(run_dir)
    update_launch(run_dir, "loading", pid=4242, message="Starting the worker process.", worker_started_at=time.time())
    update_status(run_dir, "loading", pid=4242, message="Loading the configuration.")
    assert read_run_status(run_dir).message == "Loading the configuration."
    update_status(run_dir, "training", step=3, max_steps=10, eta_s=12.5)
    status = read_run_status(run_dir)
    assert (status.state, status.step, status.max_steps, status.pid) == ("training", 3, 10, 4242)
    assert [h["state"] for h in status.history] == ["queued", "loading", "training"]  # one "loading", not two
    assert status.started_at == status.history[1]["t"] and status.ended_at is None

    worker_file = json.loads(paths.status.read_text())
    launcher_file = json.loads(paths.launch.read_text())
    assert "created_at" not in worker_file and "step" not in launcher_file
    assert launcher_file["state"] == "loading" and worker_file["state"] == "training"

    # Neither side may write the other's facts.
    with pytest.raises(ValueError, match="created_at is not written by the worker"):
        update_status(run_dir, created_at=1.0)
    with pytest.raises(ValueError, match="step is not written by the launcher"):
        update_launch(run_dir, step=1)
    with pytest.raises(ValueError, match="unknown run state 'paused'"):
        update_status(run_dir, "paused")


def test_a_final_state_the_worker_wrote_is_never_overwritten_by_a_late_observer(run_dir):
    update_status(run_dir, "training", step=7)
    update_status(run_dir, "completed", step=10, message="Completed; adapter saved.")
    # The job manager and the CLI both saw the process go, after it had finished by itself.
    assert update_launch(run_dir, "failed", unless_ended=True, error="The worker process ended unexpectedly.") is False
    status = read_run_status(run_dir)
    assert (status.state, status.error, status.step) == ("completed", None, 10)
    assert status.ended_at == status.history[-1]["t"] and status.ended_at >= status.started_at


def test_a_dead_worker_is_recorded_by_the_launcher_and_a_resume_clears_it(run_dir):
    update_status(run_dir, "training", step=5, pid=999_999_999)
    assert update_launch(run_dir, "failed", unless_ended=True, message="Failed.", error="killed by SIGKILL")
    assert update_launch(run_dir, "failed", unless_ended=True, error="seen twice") is False  # recorded once
    status = read_run_status(run_dir)
    assert (status.state, status.error, status.step) == ("failed", "killed by SIGKILL", 5)

    update_launch(run_dir, "queued", message="Queued to resume.", error=None)
    status = read_run_status(run_dir)
    assert (status.state, status.error, status.ended_at) == ("queued", None, None)
    update_launch(run_dir, "loading", pid=1234, message="Starting the worker process.")
    update_status(run_dir, "loading", pid=1234, message="Loading the configuration.", error=None)
    status = read_run_status(run_dir)
    assert (status.state, status.pid, status.error) == ("loading", 1234, None)
    assert [h["state"] for h in status.history] == ["queued", "training", "failed", "queued", "loading"]


def test_a_write_without_a_state_never_takes_the_state_over(run_dir):
    update_status(run_dir, "training", step=2)
    update_launch(run_dir, queue_position=3, message="an observation")
    status = read_run_status(run_dir)
    assert (status.state, status.queue_position) == ("training", None)  # a position means nothing while training


def test_a_stop_request_shows_until_the_worker_answers(run_dir):
    update_status(run_dir, "training", message="Training.")
    RunPaths(run_dir).stop_request.touch()
    status = read_run_status(run_dir)
    assert status.stop_requested and status.message == rundir.STOP_REQUESTED_MESSAGE
    update_status(run_dir, "saving", message="Stop requested: saving the adapter and a checkpoint.")
    assert read_run_status(run_dir).message == "Stop requested: saving the adapter and a checkpoint."


def test_fallbacks_are_recorded_once_each(run_dir):
    for sentence in ("No CUDA GPU found.", "bf16 needs a GPU.", "No CUDA GPU found."):
        rundir.add_fallback(run_dir, sentence)
    assert read_run_status(run_dir).fallbacks == ["No CUDA GPU found.", "bf16 needs a GPU."]


def test_a_run_directory_from_before_the_split_reads_the_same(tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    load_preset("demo-lora").save(RunPaths(run_dir).config)
    legacy = {"state": "completed", "created_at": 100.0, "message": "Completed; adapter saved.", "pid": 77,
              "started_at": 101.0, "ended_at": 160.0, "step": 120, "max_steps": 120, "fallbacks": ["cpu"],
              "worker_started_at": 100.5, "trainable_parameters": 10, "a_newer_fact": "kept",
              "history": [{"state": "queued", "t": 100.0}, {"state": "loading", "t": 101.0},
                          {"state": "training", "t": 105.0}, {"state": "completed", "t": 160.0}]}
    RunPaths(run_dir).status.write_text(json.dumps(legacy))
    status = read_run_status(run_dir)
    assert (status.state, status.step, status.created_at, status.pid) == ("completed", 120, 100.0, 77)
    assert (status.started_at, status.ended_at, status.worker_started_at) == (101.0, 160.0, 100.5)
    assert rundir.read_status(run_dir)["a_newer_fact"] == "kept"
    summary = rundir.summarize_run(run_dir)
    assert (summary.state, summary.duration_s, summary.step) == ("completed", 59.0, 120)
    # What a dashboard restart writes about it goes to launch.json; the old facts stay.
    update_launch(run_dir, "queued", message="Queued to resume.")
    assert read_run_status(run_dir).state == "queued" and json.loads(RunPaths(run_dir).status.read_text()) == legacy


def test_the_runs_table_is_never_older_than_the_status(run_dir):
    """The table caches parsed files by their stat; the status itself is read every time, so a
    rewrite the stat cannot see (same size, same mtime: coarse timestamps) still shows."""
    update_status(run_dir, "evaluating", message="x" * 30)
    assert rundir.list_runs(run_dir.parent)[0].state == "evaluating"
    paths = RunPaths(run_dir)
    before = paths.status.stat()
    text = paths.status.read_text().replace('"state": "evaluating"', '"state": "completed" ')
    assert len(text) == before.st_size
    paths.status.write_text(text)
    os.utime(paths.status, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert rundir.list_runs(run_dir.parent)[0].state == "completed"


# ----------------------------------------------------------------------------- concurrency
WRITER = """
import sys, time
from pathlib import Path
from engine.training import rundir
run_dir, side, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
while not (run_dir / "go").exists():
    time.sleep(0.001)
for i in range(n):
    if side == "worker":
        rundir.update_status(run_dir, "training" if i % 2 else "evaluating", step=i, eta_s=float(n - i))
        rundir.add_fallback(run_dir, f"process fallback {i}")
    else:
        rundir.update_launch(run_dir, message=f"launcher process {i}", queue_position=i)
if side == "worker":
    rundir.update_status(run_dir, "completed", step=n, message="Completed; adapter saved.")
"""


def test_concurrent_worker_and_launcher_writes_lose_nothing(run_dir):
    """A worker process and a thread beside it, a launcher process and a launcher thread, all
    writing at once: every write lands (the sequence counts them), every list entry is there,
    and the launchers never put back an older state over the worker's."""
    n = 150
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), side, str(n)], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, text=True) for side in ("worker", "launcher")]
    go = threading.Event()
    seen_states, reader_done = set(), threading.Event()

    def worker_thread():
        go.wait()
        for i in range(n):
            rundir.add_fallback(run_dir, f"thread fallback {i}")

    def launcher_thread():
        go.wait()
        for i in range(n):
            update_launch(run_dir, worker_started_at=float(i))

    def reader():
        go.wait()
        while not reader_done.is_set():
            seen_states.add(read_run_status(run_dir).state)

    threads = [threading.Thread(target=f) for f in (worker_thread, launcher_thread, reader)]
    try:
        for thread in threads:
            thread.start()
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        (run_dir / "go").touch()
        go.set()
        for process in processes:
            assert process.wait(timeout=120) == 0
        for thread in threads[:2]:
            thread.join(timeout=120)
    finally:
        reader_done.set()
        go.set()
        for process in processes:
            process.kill()
            process.wait()
    threads[2].join()

    paths = RunPaths(run_dir)
    worker_file, launcher_file = json.loads(paths.status.read_text()), json.loads(paths.launch.read_text())
    writes = 1 + (2 * n + 1) + n + n + n  # create_run, worker process, worker thread, launcher process and thread
    assert max(worker_file["seq"], launcher_file["seq"]) == writes, "a write was lost"
    status = read_run_status(run_dir)
    assert sorted(status.fallbacks) == sorted([f"process fallback {i}" for i in range(n)]
                                              + [f"thread fallback {i}" for i in range(n)])
    assert (status.state, status.step, status.message) == ("completed", n, "Completed; adapter saved.")
    assert [h["state"] for h in status.history] == (
        ["queued"] + ["evaluating", "training"] * (n // 2) + ["completed"])
    assert seen_states <= set(rundir.STATES), f"a reader saw a half-written status: {seen_states}"


# ----------------------------------------------------------------------------- incremental reading
def test_read_jsonl_leaves_a_partial_last_line_for_the_next_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert rundir.read_jsonl(path) == ([], 0)  # not written yet
    rundir.append_jsonl(path, {"step": 1})
    rundir.append_jsonl(path, {"step": 2})
    with open(path, "a") as handle:
        handle.write('{"step": 3, "lo')  # a writer mid-append
    records, offset = rundir.read_jsonl(path)
    assert records == [{"step": 1}, {"step": 2}]
    assert offset == len(b'{"step": 1}\n{"step": 2}\n')
    assert rundir.read_jsonl(path, offset) == ([], offset)
    with open(path, "a") as handle:
        handle.write('ss": 0.5}\nnot json\n{"step": 4}\n')
    records, end = rundir.read_jsonl(path, offset)
    assert records == [{"step": 3, "loss": 0.5}, {"step": 4}]  # the broken line is skipped, not fatal
    assert end == path.stat().st_size


def test_run_watcher_reads_only_what_was_appended(run_dir):
    watcher = rundir.RunWatcher(run_dir)
    assert watcher.refresh() is False and watcher.metrics == [] and watcher.gpu_samples == []
    paths = RunPaths(run_dir)
    rundir.append_jsonl(paths.metrics, {"event": "log", "step": 1, "loss": 2.0})
    sample = {"t": 1.0, "source": "process_rss", "devices": [], "process_bytes": 5, "error": None}
    rundir.append_jsonl(paths.gpu, sample)
    assert watcher.refresh() is True
    assert [m["step"] for m in watcher.metrics] == [1] and len(watcher.gpu_samples) == 1
    assert watcher.refresh() is False  # nothing new: nothing re-read
    rundir.append_jsonl(paths.metrics, {"event": "log", "step": 2, "loss": 1.0})
    assert watcher.refresh() is True
    assert [m["step"] for m in watcher.metrics] == [1, 2] and len(watcher.gpu_samples) == 1


# ----------------------------------------------------------------------------- adapters and checkpoints
def _adapter(folder: Path, weights: bool = True, complete: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete and folder.name.startswith("checkpoint-"):
        rundir.mark_checkpoint_complete(folder)
    return folder


def test_checkpoints_are_found_by_step_and_adapters_need_their_weights(run_dir):
    folder = RunPaths(run_dir).checkpoints
    assert rundir.checkpoints(run_dir) == [] and rundir.latest_checkpoint(run_dir) is None
    assert rundir.latest_adapter(run_dir) is None
    _adapter(folder / "checkpoint-2")
    _adapter(folder / "checkpoint-10")
    _adapter(folder / "checkpoint-30", weights=False)  # complete, but a full fine-tune's: no adapter weights
    _adapter(folder / "checkpoint-60", complete=False)  # written by a worker killed mid-save
    (folder / "checkpoint-x").mkdir()
    (folder / "checkpoint-40").write_text("a file, not a checkpoint")
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert rundir.latest_checkpoint(run_dir).name == "checkpoint-30"  # by number: 30 > 10 > 2; 60 is cut short
    assert [p.name for p in rundir.incomplete_checkpoints(run_dir)] == ["checkpoint-60"]
    assert [p.name for p in rundir.checkpoints(run_dir, adapters_only=True)] == ["checkpoint-2", "checkpoint-10"]
    assert not rundir.has_adapter(folder / "checkpoint-30") and rundir.has_adapter(folder / "checkpoint-10")

    update_status(run_dir, "training")
    assert rundir.latest_adapter(run_dir).name == "checkpoint-10"  # running: the newest usable checkpoint
    adapter = _adapter(RunPaths(run_dir).adapter)
    assert rundir.latest_adapter(run_dir).name == "checkpoint-10"  # adapter/ of an earlier attempt: not yet
    update_status(run_dir, "completed")
    assert rundir.latest_adapter(run_dir) == adapter  # ended: the final save
    assert rundir.summarize_run(run_dir).has_adapter


def test_a_checkpoint_counts_when_marked_or_when_transformers_last_file_is_whole(run_dir):
    folder = RunPaths(run_dir).checkpoints
    unmarked = _adapter(folder / "checkpoint-5", complete=False)
    assert not rundir.checkpoint_complete(unmarked)
    (unmarked / "trainer_state.json").write_text('{"global_step": 5, "log_hist')  # cut mid-write
    assert not rundir.checkpoint_complete(unmarked)
    (unmarked / "trainer_state.json").write_text('{"global_step": 5}')  # whole: killed just before the mark
    assert rundir.checkpoint_complete(unmarked)
    (unmarked / "trainer_state.json").write_text('{"global_step": 4}')  # not this checkpoint's state
    assert not rundir.checkpoint_complete(unmarked)
    assert rundir.remove_incomplete_checkpoints(run_dir) == ["checkpoint-5"] and not unmarked.exists()


# ----------------------------------------------------------------------------- crash consistency
def test_a_recorded_active_state_without_a_live_worker_reads_as_interrupted(tmp_path):
    run_dir = rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name="gone")
    _adapter(RunPaths(run_dir).checkpoints / "checkpoint-4")
    update_launch(run_dir, "loading", pid=2**22 + 11)  # no such process, and nobody holds worker.lock
    update_status(run_dir, "training", step=7)
    status = read_run_status(run_dir)
    assert (status.state, status.recorded_state) == ("interrupted", "training")
    assert "last step 7" in status.error and "Resume continues from checkpoint-4" in status.error
    assert read_run_status(run_dir, derive=False).state == "training"  # what the files say, for writers
    with rundir.hold_worker_lock(run_dir):  # a live worker (this process plays it)
        assert rundir.worker_lock_held(run_dir) and read_run_status(run_dir).state == "training"
        assert rundir.worker_lock_holder(run_dir)["pid"] == os.getpid()
        with pytest.raises(RunError, match="already has a live worker"):
            with rundir.hold_worker_lock(run_dir, wait_s=0.2):
                pass
    assert not rundir.worker_lock_held(run_dir) and read_run_status(run_dir).state == "interrupted"


def test_resumed_steps_supersede_the_rolled_back_ones(run_dir):
    paths = RunPaths(run_dir)
    for step in (5, 10, 15, 20):
        rundir.append_jsonl(paths.metrics, {"event": "log", "step": step, "loss": 1.0 / step})
    watcher = rundir.RunWatcher(run_dir)
    watcher.refresh()
    before = watcher.metrics_version
    rundir.append_jsonl(paths.metrics, rundir.resume_record(10, "checkpoint-10"))
    rundir.append_jsonl(paths.metrics, {"event": "log", "step": 15, "loss": 0.5})
    watcher.refresh()
    expected = [5, 10, 10, 15]  # the resume event sits at step 10; the first attempt's 15 and 20 are gone
    assert [m["step"] for m in rundir.read_metrics(run_dir)] == expected
    assert [m["step"] for m in watcher.metrics] == expected and watcher.metrics_version > before
    assert [m["loss"] for m in watcher.metrics if m.get("event") == "log"][-1] == 0.5


def test_the_watcher_is_safe_to_share_between_threads(run_dir):
    paths = RunPaths(run_dir)
    with open(paths.metrics, "a") as handle:
        for step in range(3000):
            handle.write(json.dumps({"event": "log", "step": step, "loss": 1.0}) + "\n")
    watcher = rundir.RunWatcher(run_dir)
    threads = [threading.Thread(target=watcher.refresh) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(watcher.metrics) == 3000


@pytest.mark.parametrize("name, content, note", [
    ("status.json", b"[1, 2, 3]", "status.json is not a JSON object (it holds a list)"),
    ("status.json", b'{"step": "abc", "state": "training"}', "status.json: step is 'abc', not a whole number"),
    ("status.json", b"{not json", "status.json is not valid JSON"),
    ("launch.json", b"\0\0\0", "launch.json is not valid JSON"),
    ("config.yaml", b"model: [unclosed", "config.yaml is not valid YAML"),
    ("config.yaml", b"- 1\n- 2\n", "config.yaml is not a mapping (it holds a list)"),
    ("gpu.jsonl", b"\0\0\0\0\n", "gpu.jsonl has 1 damaged line"),
    ("metrics.jsonl", b'{"step": "x"}\n[1]\n', "metrics.jsonl has 2 damaged lines"),
])
def test_a_damaged_entry_is_a_note_on_its_row_never_a_failure(tmp_path, name, content, note):
    runs = tmp_path / "runs"
    healthy = rundir.create_run(runs, load_preset("demo-lora"), name="healthy")
    damaged = rundir.create_run(runs, load_preset("demo-lora"), name="damaged")
    rundir.append_jsonl(RunPaths(damaged).metrics, {"event": "log", "step": 1, "loss": 2.0})
    with open(damaged / name, "ab" if name.endswith(".jsonl") else "wb") as handle:
        handle.write(content)
    rows = {summary.name: summary for summary in rundir.list_runs(runs)}
    assert set(rows) == {"healthy", "damaged"} and rows["healthy"].notes == []
    assert note in rows["damaged"].note, rows["damaged"].notes
    assert note in rows["damaged"].as_row()["note"]
    assert rundir.read_run_status(damaged).state in rundir.STATES + ("unknown",)
    rundir.read_metrics(damaged), rundir.read_gpu_samples(damaged)  # never raise
    assert healthy.exists()


def test_a_failed_start_leaves_no_half_made_folder(tmp_path, monkeypatch):
    import errno as errno_module

    def full(*args, **kwargs):
        raise OSError(errno_module.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "ensure_reserve", full)  # the disk fills between the config and the reserve
    with pytest.raises(RunError, match="was not created.*was full"):
        rundir.create_run(tmp_path / "runs", load_preset("demo-lora"), name="half")
    assert list((tmp_path / "runs").iterdir()) == []


def test_run_fields_take_run_names_only(tmp_path):
    outside = rundir.create_run(tmp_path / "elsewhere", load_preset("demo-lora"), name="x")
    with pytest.raises(RunError, match="not a valid run name"):
        rundir.resolve_run(tmp_path / "runs", str(outside))
    assert rundir.resolve_run(tmp_path / "runs", str(outside), allow_path=True) == outside  # the CLI's choice
