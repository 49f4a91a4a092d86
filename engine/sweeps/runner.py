"""Starting, running and stopping a sweep: its runs go through the job manager one at a time.

``start_sweep`` creates every run first (ordinary run directories, each recording its sweep
id in launch.json and its values in its description), writes sweep.json, then hands the runs
to a queue: the dashboard's ``JobManager.enqueue``, or, from the command line, a
``JobManager`` of its own (``run_sweep``; ``python -m engine sweep run SWEEP_DIR`` when
detached). Because a queued run is recorded as queued in its own folder, a dashboard that
restarts queues it again (``JobManager.recover``) and adopts the live one.

``stop_sweep`` takes the queued runs off (recorded as stopped, so no manager starts them
later) and then asks the live run to stop, through the one stop protocol of
``engine.training.jobs``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine.errors import LoraLabError, RunError
from engine.sweeps import store
from engine.sweeps.spec import SweepPlan, value_slug
from engine.training import rundir


def start_sweep(plan: SweepPlan, runs_dir: Path, sweeps_dir: Path, enqueue: Callable[[Path], object] | None = None,
                sweep_id: str | None = None) -> Path:
    """Create the sweep's folder and its runs, then queue them with ``enqueue`` (when given); the sweep's folder."""
    runs_dir, sweeps_dir = Path(runs_dir), Path(sweeps_dir)
    base = sweep_id or store.new_sweep_id(plan.varies[0].field)
    sweeps_dir.mkdir(parents=True, exist_ok=True)
    candidate, counter = base, 1
    while True:
        sweep_dir = store.sweep_path(sweeps_dir, candidate)
        try:
            sweep_dir.mkdir()
            break
        except FileExistsError:
            counter += 1
            candidate = f"{base}-{counter}"
    sweep_id = candidate
    # The sweep's own facts; how its runs are doing is read from the runs themselves (store.sweep_state).
    data = {"id": sweep_id, "created_at": time.time(), "preset": plan.preset, "overrides": plan.overrides,
            "base_config": plan.base.to_dict() if plan.base is not None else None,
            "vary": [{"field": v.field, "values": v.values} for v in plan.varies], "runs": [], "stopped_at": None}
    created: list[Path] = []
    try:
        for run in plan.runs:
            config = run.config
            config.description = (f"sweep {sweep_id}: {run.label}" + (f". {config.description}"
                                                                      if config.description else ""))
            name = f"{sweep_id}-" + "-".join(f"{name.rsplit('.', 1)[-1]}{value_slug(value)}"
                                             for name, value in run.values.items())
            run_dir = rundir.create_run(runs_dir, config, name=name)
            created.append(run_dir)
            rundir.update_launch(run_dir, sweep=sweep_id)
            data["runs"].append({"name": run_dir.name, "values": run.values, "label": run.label,
                                 "predicted_peak_bytes": run.predicted_peak_bytes})
        store.write_sweep(sweep_dir, data)
    except (LoraLabError, OSError) as error:
        for run_dir in created:  # made but never to be started: said in their folders
            try:
                rundir.update_launch(run_dir, "stopped", message=f"Not started: sweep {sweep_id} could not be "
                                                                 f"created ({error}).")
            except OSError:
                pass
        raise RunError(f"Sweep {sweep_id} was not started: {error}") from None
    if enqueue is not None:
        for run_dir in created:
            enqueue(run_dir)
    return sweep_dir


def sweep_states(sweep: dict, runs_dir: Path) -> list[str]:
    states = []
    for _, run_dir in store.run_dirs(sweep, runs_dir):
        try:
            states.append(rundir.read_run_status(run_dir).state)
        except OSError:
            states.append("unknown")
    return states


def stop_sweep(sweep_dir: Path, runs_dir: Path, jobs=None) -> str:
    """Drop the sweep's queued runs and ask its live run to stop; a sentence saying what was done.

    ``jobs``: the dashboard's JobManager, whose in-memory queue loses the runs too (any other
    manager skips them when it gets to them: they are no longer recorded as queued).
    """
    from engine.training.jobs import request_stop

    sweep = store.read_sweep(sweep_dir)
    sweep_id = sweep.get("id", Path(sweep_dir).name)
    sweep["stopped_at"] = sweep.get("stopped_at") or time.time()
    store.write_sweep(sweep_dir, sweep)
    dropped, asked, ended = [], [], []
    message = f"Removed from the queue: sweep {sweep_id} was stopped."
    pairs = store.run_dirs(sweep, runs_dir)
    for _, run_dir in pairs:
        status = rundir.read_run_status(run_dir)
        if status.state == "queued":
            if jobs is None or not jobs.dequeue(run_dir, message):
                rundir.update_launch(run_dir, "stopped", message=message, queue_position=None)
            dropped.append(run_dir.name)
    for _, run_dir in pairs:
        status = rundir.read_run_status(run_dir)
        if status.active:
            try:
                if jobs is not None and jobs.active_name() == run_dir.name:
                    jobs.stop(run_dir.name)
                else:
                    request_stop(run_dir)
                asked.append(run_dir.name)
            except LoraLabError:
                ended.append(run_dir.name)  # it ended between the read and the request
        elif run_dir.name not in dropped:
            ended.append(run_dir.name)
    parts = []
    if asked:
        parts.append(f"run {', '.join(asked)} was asked to stop (it finishes its step and saves its adapter and a "
                     "checkpoint)")
    if dropped:
        parts.append(f"{len(dropped)} queued run{'s' if len(dropped) != 1 else ''} dropped ({', '.join(dropped)})")
    if ended:
        parts.append(f"{len(ended)} had already ended")
    return f"Sweep {sweep_id} stopped: " + ("; ".join(parts) if parts else "it had no runs") + "."


def run_sweep(sweep_dir: Path, runs_dir: Path, poll_s: float = 0.5, say: Callable[[str], None] = print) -> str:
    """Run a sweep's queued runs one at a time with a job manager of this process, until none is left.

    Used by the command line (in the foreground, or detached as ``python -m engine sweep run``).
    A live run of the sweep (this runner restarted) is adopted, never started twice. Returns the sweep's state.
    """
    from engine.training.jobs import JobManager

    sweep = store.read_sweep(sweep_dir)
    jobs = JobManager(runs_dir, poll_s=poll_s, recover=False)
    for _, run_dir in store.run_dirs(sweep, runs_dir):
        status = rundir.read_run_status(run_dir)
        if status.active:
            jobs.adopt(run_dir)
        elif status.state == "queued":
            jobs.enqueue(run_dir)
    jobs.start()
    last: dict[str, str] = {}
    try:
        while True:
            states = sweep_states(sweep, runs_dir)
            for (_, run_dir), state in zip(store.run_dirs(sweep, runs_dir), states):
                said = "training" if state == "evaluating" else state  # not every evaluation: the states that matter
                if last.get(run_dir.name) != said:
                    say(f"{run_dir.name}: {said}")
                    last[run_dir.name] = said
            if not any(state in ("queued", *rundir.ACTIVE_STATES) for state in states):
                break
            time.sleep(poll_s)
    finally:
        jobs.shutdown()
    sweep = store.read_sweep(sweep_dir)
    return store.sweep_state(sweep, sweep_states(sweep, runs_dir))


def spawn_runner(sweep_dir: Path, runs_dir: Path) -> subprocess.Popen:
    """``python -m engine sweep run SWEEP_DIR`` detached (its own session), its output in the sweep's runner.log."""
    from engine.training.jobs import PROJECT_ROOT

    log = open(Path(sweep_dir) / "runner.log", "ab")
    with log:
        return subprocess.Popen([sys.executable, "-m", "engine", "sweep", "run", str(sweep_dir), "--runs-dir",
                                 str(runs_dir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_ROOT, start_new_session=True)
