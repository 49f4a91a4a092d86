"""Where a run keeps its eval report: ``RUN/eval/report.json`` and ``report.html`` (read by the store and the UI)."""

from __future__ import annotations

from pathlib import Path

from engine.training import rundir


def report_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


def report_path(run_dir: Path) -> Path:
    return report_dir(run_dir) / "report.json"


def read_report(run_dir: Path) -> dict | None:
    return rundir.read_json(report_path(run_dir), default=None)
