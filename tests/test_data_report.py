"""The background statistics job: progress, partial figures, cancellation, errors as sentences."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.data.report import StatsJob, inspect_dataset  # noqa: E402

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
