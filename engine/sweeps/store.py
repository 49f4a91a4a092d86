"""A sweep is a directory: ``sweeps/<id>/sweep.json``, beside the runs folder.

sweep.json holds the plan (preset, ``--set`` overrides, varied fields and values), the names
of its runs with their values and predicted peaks, and whether it was stopped. Everything
else (each run's progress, losses, memory) stays in the runs' own directories, the one
source of truth, and is read from there; every sweep run is an ordinary run that also
records its sweep id in its launch.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.errors import RunError
from engine.names import check_name, name_problem
from engine.training import rundir

SWEEP_FILE = "sweep.json"


def sweeps_dir_for(runs_dir: Path) -> Path:
    """Where sweeps live: $LORALAB_SWEEPS_DIR, else ``sweeps/`` beside the runs folder."""
    chosen = os.environ.get("LORALAB_SWEEPS_DIR")
    return Path(chosen) if chosen else Path(runs_dir).resolve().parent / "sweeps"


def new_sweep_id(field: str) -> str:
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{field.rsplit('.', 1)[-1]}"


def sweep_path(sweeps_dir: Path, sweep_id: str) -> Path:
    """The folder of sweep ``sweep_id``, refusing any name that could leave ``sweeps_dir``."""
    return Path(sweeps_dir) / check_name(sweep_id, "sweep", RunError)


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json as a mapping; ``RunError`` in words when it is missing or damaged."""
    data = rundir.read_json(Path(sweep_dir) / SWEEP_FILE)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise RunError(f"{Path(sweep_dir) / SWEEP_FILE} is missing or damaged: not a sweep.")
    return data


def write_sweep(sweep_dir: Path, data: dict) -> None:
    rundir.write_json_atomic(Path(sweep_dir) / SWEEP_FILE, data)


def resolve_sweep(sweeps_dir: Path, name_or_path: str, allow_path: bool = False) -> Path:
    """A sweep by id (inside ``sweeps_dir``) or, from a command line (``allow_path``), by its folder's path.

    The dashboard passes ids only, so nothing typed there reaches a folder outside the sweeps folder.
    """
    text = str(name_or_path or "").strip()
    path = Path(text).expanduser()
    if allow_path and name_problem(text) is not None and (path / SWEEP_FILE).is_file():
        return path
    folder = sweep_path(sweeps_dir, text)
    if not (folder / SWEEP_FILE).is_file():
        known = ", ".join(list_sweeps(sweeps_dir)[:5]) or "none yet"
        raise RunError(f"No sweep named '{text}' in {sweeps_dir} (sweeps there: {known}).")
    return folder


def list_sweeps(sweeps_dir: Path) -> list[str]:
    """Sweep ids, newest first."""
    try:
        found = [p for p in Path(sweeps_dir).iterdir() if (p / SWEEP_FILE).is_file()]
    except OSError:
        return []
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_dirs(sweep: dict, runs_dir: Path) -> list[tuple[dict, Path]]:
    """(the sweep's entry, the run's folder) for each of its runs, in order."""
    return [(entry, Path(runs_dir) / entry["name"]) for entry in sweep["runs"]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str)]


def sweep_state(sweep: dict, states: list[str]) -> str:
    """One word for the sweep from its runs' states: stopped, running, completed or ended (some failed)."""
    if sweep.get("stopped_at"):
        return "stopped"
    if any(state in ("queued", *rundir.ACTIVE_STATES) for state in states):
        return "running"
    if states and all(state == "completed" for state in states):
        return "completed"
    return "ended"
