"""The background statistics job: progress, partial figures, cancellation, errors as sentences, and the
dashboard's bounded registry of jobs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.data.report import StatsJob, StatsJobs, inspect_dataset
from tests.data import tiny_tokenizer

DATA = Path(__file__).parent / "data"


def write_rows(path: Path, count: int) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"instruction": f"Say {i}", "output": str(i)}) + "\n")
    return path


def wait_for(job: StatsJob, condition, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = job.snapshot()
        if condition(snapshot):
            return snapshot
        time.sleep(0.01)
    raise AssertionError(f"condition not reached; last state {job.snapshot()['state']}")


def test_job_reports_progress_then_the_same_figures_as_a_direct_pass(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 3000)
    job = StatsJob(source=str(path), model=None, max_length=64, eval_fraction=0.2).start()
    running = wait_for(job, lambda s: s["partial"] is not None and s["partial"].rows > 0 or s["report"])
    assert 0.0 <= running["progress"] <= 1.0
    done = wait_for(job, lambda s: s["state"] != "running")
    assert done["state"] == "done" and done["progress"] == 1.0
    direct = inspect_dataset(str(path), model=None, max_length=64, eval_fraction=0.2)
    assert done["report"].to_dict() == direct.to_dict()
    assert direct.rows == 3000 and direct.eval_rows == 600 and direct.format == "alpaca"


def test_job_can_be_stopped_and_says_its_figures_are_partial(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 200_000)
    job = StatsJob(source=str(path), model=None, max_length=64).start()
    wait_for(job, lambda s: s["partial"] is not None and s["partial"].rows > 100)
    job.cancel()
    done = wait_for(job, lambda s: s["state"] != "running")
    assert done["state"] == "cancelled"
    report = done["report"]
    assert not report.complete and 100 < report.rows < 200_000
    assert report.sha256 == ""  # not hashed: the pass did not finish
    assert "Stopped early" in report.to_text()


def test_job_errors_are_sentences(tmp_path):
    job = StatsJob(source=str(DATA / "malformed.jsonl"), model=None).start()
    done = wait_for(job, lambda s: s["state"] != "running")
    assert done["state"] == "error" and "malformed.jsonl, line 3" in done["error"]


def test_context_length_warning_uses_the_tokenizer_limit(tmp_path):
    tokenizer = tiny_tokenizer.build_tiny_tokenizer()
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(tmp_path / "tok")
    report = inspect_dataset(str(DATA / "text.jsonl"), model=str(tmp_path / "tok"), max_length=64)
    assert any("above the model's context length of 32" in w for w in report.warnings)
    report = inspect_dataset(str(DATA / "text.jsonl"), model=str(tmp_path / "tok"), max_length=32)
    assert not any("context length" in w for w in report.warnings)


def test_registry_starts_finds_cancels_and_keeps_a_bounded_number(tmp_path):
    small = write_rows(tmp_path / "small.jsonl", 50)
    big = write_rows(tmp_path / "big.jsonl", 200_000)
    jobs = StatsJobs(keep=2)
    first = jobs.start(source=str(big), model=None, max_length=64)
    assert jobs.get(first) is not None and jobs.get("no-such-id") is None and jobs.get(None) is None
    wait_for(jobs.get(first), lambda s: s["partial"] is not None and s["partial"].rows > 0)

    # A pass is cancelled by id and ends with partial figures.
    assert jobs.cancel(first) is True
    assert wait_for(jobs.get(first), lambda s: s["state"] != "running")["state"] == "cancelled"
    assert jobs.cancel("no-such-id") is False

    # Past ``keep`` passes the oldest is cancelled and forgotten; the newest finish normally.
    evicted_job = jobs.get(jobs.start(source=str(big), model=None, max_length=64))
    kept = [jobs.start(source=str(small), model=None, max_length=64) for _ in range(2)]
    assert len(jobs) == 2 and jobs.get(first) is None
    assert wait_for(evicted_job, lambda s: s["state"] != "running")["state"] == "cancelled"
    for job_id in kept:
        done = wait_for(jobs.get(job_id), lambda s: s["state"] != "running")
        assert done["state"] == "done" and done["report"].rows == 50


def test_a_pass_nobody_polls_any_more_stops_by_itself(tmp_path):
    """Work stops when the client leaves: the page polls every second, and silence means it is gone."""
    path = write_rows(tmp_path / "rows.jsonl", 200_000)
    job = StatsJob(source=str(path), model=None, max_length=64, abandoned_after_s=0.5).start()
    job.wait(timeout=60)  # nobody polls while it runs
    assert not job._thread.is_alive()
    report = job.snapshot()["report"]
    assert job.state == "cancelled" and not report.complete and report.rows < 200_000
