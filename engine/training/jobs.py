"""Starting, stopping, queueing and recovering training workers.

One training job at a time per machine (one GPU), a FIFO queue behind it. Workers are
separate processes in their own session, writing to their run directory; their output
goes to ``train.log`` (a file, never a pipe nobody drains). Because the run directory is
the truth, a restarted dashboard finds its runs again: a worker still alive is adopted,
a dead one's run is marked ``interrupted``, queued runs are queued again.

Everything here is the launcher's side of a run: it writes ``launch.json`` through
``rundir.update_launch`` and never the worker's ``status.json``. Stopping has one
protocol for the dashboard, ``python -m engine stop`` and Ctrl-C alike: ``request_stop``
(the ``stop_request`` file first, a kill on the second request) and ``kill_worker``.

This queue is only this dashboard's. Across processes (two dashboards on one runs folder, a
CLI run beside a dashboard run) the worker itself keeps the order: it holds its run's
``worker.lock`` (so a run is never trained twice at once, and readers know when it died)
and its device's lock (``engine.training.devices``: a second run waits, saying for whom).
A run folder that cannot be written (a full disk) never holds the manager up: the job is
released first, and what could not be recorded is said once on stderr.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.errors import RunError
from engine.training import rundir
from engine.training.rundir import RunPaths, update_launch
from engine.training.worker import EXIT_DUPLICATE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FORCE_STOP_AFTER_S = 120.0  # a graceful stop that has not finished by then is forced


def worker_command(run_dir: Path, resume: bool) -> list[str]:
    """The one process the manager starts: the worker, or for a ddp/fsdp run the launcher of its ranks."""
    module = "engine.training.launch" if is_multi_process(run_dir) else "engine.training.worker"
    return [sys.executable, "-m", module, str(run_dir)] + (["--resume"] if resume else [])


def is_multi_process(run_dir: Path) -> bool:
    """Whether the run's config asks for several processes (a config that cannot be read: the worker says why)."""
    from engine.config import RunConfig
    from engine.errors import ConfigError

    try:
        return RunConfig.from_yaml(RunPaths(run_dir).config).distributed.strategy != "none"
    except ConfigError:
        return False


def spawn_worker(run_dir: Path, resume: bool = False) -> subprocess.Popen:
    """Start the worker detached (own session), stdout+stderr appended to train.log.

    Refused in words, before any process starts, when the run's disk is full (the worker
    could not even record its start) and when a worker of this run is already alive.
    """
    paths = RunPaths(run_dir)
    if rundir.worker_alive(run_dir, rundir.read_run_status(run_dir, derive=False).pid):
        raise RunError(f"Run '{Path(run_dir).name}' already has a live worker; it was not started again.")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        paths.stop_request.unlink(missing_ok=True)  # left by an earlier attempt; a new one starts unasked
        rundir.ensure_reserve(run_dir)  # room to record a disk-full failure later
        log_file = open(paths.log, "ab")
    except OSError as error:
        raise _start_refused(run_dir, error) from None
    with log_file:
        process = subprocess.Popen(
            worker_command(run_dir, resume), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT, env=env, start_new_session=True,
        )
    try:
        update_launch(run_dir, "loading", pid=process.pid, message="Starting the worker process.", error=None,
                      worker_started_at=time.time(), queue_position=None)
    except OSError as error:  # nothing may train that the run folder cannot tell about
        process.kill()
        process.wait()
        raise _start_refused(run_dir, error) from None
    return process


def _start_refused(run_dir: Path, error: OSError) -> RunError:
    if rundir.is_disk_full(error, run_dir):
        return RunError(f"Run '{Path(run_dir).name}' was not started. " + rundir.disk_full_sentence(run_dir) +
                        " Free some space there and try again.")
    return RunError(f"Run '{Path(run_dir).name}' was not started: {run_dir} cannot be written "
                    f"({error.strerror or error}).")


worker_alive = rundir.worker_alive  # one owner: the run directory knows whether its worker lives


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        number = -returncode
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
        hint = " (the system's out-of-memory killer or a kill command)" if number == signal.SIGKILL else ""
        return f"The worker process was killed by {name}{hint}."
    if returncode is None:
        return "The worker process ended unexpectedly."
    return f"The worker process exited with code {returncode} without recording why."


def mark_dead_worker(run_dir: Path, returncode: int | None, interrupted: bool = False) -> None:
    """A worker gone without a final status: say so (unless it wrote one itself)."""
    step = rundir.read_run_status(run_dir, derive=False).step
    if interrupted:
        update_launch(run_dir, "interrupted", unless_ended=True, message="Interrupted.",
                      error=f"The worker was no longer running when the dashboard (re)started; last step {step}."
                            + rundir.resume_hint(run_dir))
    else:
        update_launch(run_dir, "failed", unless_ended=True, message="Failed.",
                      error=f"{describe_exit(returncode)} Last recorded step: {step}." + rundir.resume_hint(run_dir))


def request_stop(run_dir: Path, force: bool = False, process: subprocess.Popen | None = None,
                 reason: str = "Stopped by force (a second stop request).") -> str:
    """Stop a run's live worker, whoever started it: the one stop protocol of the UI, the CLI and Ctrl-C.

    The first request leaves ``stop_request`` for the worker, which finishes its step,
    saves the adapter and a checkpoint and exits ("requested"). A second request, or
    ``force``, kills the worker's process group ("killed"). ``process``: the Popen, when
    the caller started the worker, so it is reaped. A run whose worker is gone is said to
    be so (and recorded as interrupted) instead.
    """
    status = rundir.read_run_status(run_dir)
    pid = rundir.live_worker_pid(run_dir, status.pid)
    if pid is None:
        name = Path(run_dir).name
        if status.recorded_state is not None:  # the files said it runs; the worker is gone
            try:
                mark_dead_worker(run_dir, None, interrupted=True)
            except OSError:
                pass  # a read-only folder: the reader's view already says interrupted
            raise RunError(f"Run '{name}' is not running: its worker (pid {status.pid}) is gone, so it is "
                           f"interrupted at step {status.step}." + rundir.resume_hint(run_dir))
        raise RunError(f"Run '{name}' has no live worker (it is {status.state}).")
    paths = RunPaths(run_dir)
    if force or paths.stop_request.exists():
        kill_worker(run_dir, pid, reason, process)
        return "killed"
    try:
        rundir.write_despite_full_disk(run_dir, paths.stop_request.touch)
    except OSError as error:
        raise RunError(f"Could not ask run '{Path(run_dir).name}' to stop: {run_dir} cannot be written "
                       f"({error.strerror or error}); stop it by force instead.") from None
    return "requested"


def kill_worker(run_dir: Path, pid: int, reason: str, process: subprocess.Popen | None = None,
                wait_s: float = 10.0) -> None:
    """SIGKILL the worker and its children, wait until it is gone, and record ``stopped`` with ``reason``.

    Nothing is recorded if the worker reached a final state by itself just before.
    """
    # A multi-GPU run's ranks are the launcher's children in sessions of their own (torchrun starts them
    # so): listed before the kill, killed right after the launcher (first, so it records no rank's death).
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        try:
            os.killpg(pid, signal.SIGKILL)  # its own session (spawn_worker): the children go too
        except ProcessLookupError:
            os.kill(pid, signal.SIGKILL)  # started by hand, not a group leader
    except ProcessLookupError:
        pass  # already gone
    except PermissionError:
        raise RunError(f"Not allowed to stop the worker of run '{Path(run_dir).name}' (pid {pid}): it belongs to "
                       "another user.") from None
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass  # gone already, or not ours
    if process is not None:
        process.wait(timeout=wait_s)
    else:
        deadline = time.time() + wait_s
        while rundir.worker_alive(run_dir, pid) and time.time() < deadline:
            time.sleep(0.05)
    no_checkpoint = None if rundir.latest_checkpoint(run_dir) else "No checkpoint had been saved; resume starts over."
    update_launch(run_dir, "stopped", unless_ended=True, message=reason, error=no_checkpoint)
    RunPaths(run_dir).stop_request.unlink(missing_ok=True)


def stop_requested_for(run_dir: Path) -> float | None:
    """Seconds since a stop was requested, or None."""
    try:
        return time.time() - RunPaths(run_dir).stop_request.stat().st_mtime
    except FileNotFoundError:
        return None


@dataclass
class ActiveJob:
    run_dir: Path
    process: subprocess.Popen | None  # None for a worker adopted after a dashboard restart
    pid: int


class JobManager:
    """The dashboard's (or a test's) view of training jobs. Thread-safe; polls, never blocks the UI."""

    def __init__(self, runs_dir: Path, poll_s: float = 0.5, recover: bool = True):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.queue: deque[tuple[Path, bool]] = deque()
        self.active: ActiveJob | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_said: str | None = None
        if recover:
            self.recover()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> JobManager:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loralab-jobs", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop polling. Running workers are left running: they belong to their run directory."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - the manager must outlive any single bad run
                self._say(f"job manager: {error}")
            self._stop.wait(self.poll_s)

    def _say(self, message: str) -> None:
        """stderr, once per distinct message: a persistent problem must not flood the dashboard's log."""
        if message != self._last_said:
            print(message, file=sys.stderr, flush=True)
            self._last_said = message

    def _record(self, what: str, write) -> None:
        """Record an observation in a run folder; a folder that cannot take it (a full disk, no permission)
        is said once and never holds the manager up."""
        try:
            write()
        except OSError as error:
            self._say(f"job manager: could not record {what}: {error}")

    # ------------------------------------------------------------------ actions
    def submit(self, config, name: str | None = None) -> Path:
        """Validate, create the run directory and queue it; returns the run directory."""
        config.validate()
        return self.enqueue(rundir.create_run(self.runs_dir, config, name=name))

    def enqueue(self, run_dir: Path, resume: bool = False) -> Path:
        """Queue a run that already exists (``rundir.create_run``; a sweep makes all of its runs first)."""
        with self._lock:
            self.queue.append((Path(run_dir), resume))
            self._refresh_queue_messages()
        self.poll()
        return Path(run_dir)

    def adopt(self, run_dir: Path) -> bool:
        """Watch a run whose worker is alive (started elsewhere) as this manager's job, if it has none."""
        with self._lock:
            pid = rundir.live_worker_pid(run_dir, rundir.read_run_status(run_dir, derive=False).pid)
            if self.active is not None or pid is None:
                return False
            self.active = ActiveJob(run_dir=Path(run_dir), process=None, pid=pid)
            return True

    def dequeue(self, run_dir: Path, message: str = "Removed from the queue before it started.") -> bool:
        """Take a run off this manager's queue and record it as stopped with ``message``; False if not queued here."""
        with self._lock:
            for item in list(self.queue):
                if item[0] == Path(run_dir):
                    self.queue.remove(item)
                    update_launch(run_dir, "stopped", message=message, queue_position=None)
                    self._refresh_queue_messages()
                    return True
        return False

    def resume(self, name: str) -> Path:
        run_dir = rundir.resolve_run(self.runs_dir, name)
        state = rundir.read_run_status(run_dir).state
        if state not in ("stopped", "interrupted", "failed"):
            raise RunError(f"Run '{run_dir.name}' is {state}; only a stopped, interrupted or failed run can resume.")
        with self._lock:
            update_launch(run_dir, "queued", message="Queued to resume.", error=None)
            self.queue.append((run_dir, True))
            self._refresh_queue_messages()
        self.poll()
        return run_dir

    def stop(self, name: str, force: bool = False) -> str:
        """Graceful first (finish the step, save, exit); a second call or ``force`` kills."""
        run_dir = rundir.resolve_run(self.runs_dir, name)
        with self._lock:
            if self.dequeue(run_dir):
                return "dequeued"
            job = self.active if self.active and self.active.run_dir == run_dir else None
        status = rundir.read_run_status(run_dir)
        if job is None and not status.active and status.recorded_state is None:
            raise RunError(f"Run '{run_dir.name}' is not running (it is {status.state}).")
        # Ours or one started from the CLI: the same protocol either way.
        return request_stop(run_dir, force=force, process=job.process if job else None)

    # ------------------------------------------------------------------ polling
    def poll(self) -> None:
        """Reap a finished worker, force a stop that timed out, start the next queued run.

        The job is released first and recorded after: a run folder that cannot be written
        (a full disk) must never keep the manager polling one dead job.
        """
        with self._lock:
            job = self.active
            if job is not None:
                returncode = job.process.poll() if job.process else (
                    None if rundir.worker_alive(job.run_dir, job.pid) else -999)
                waited = stop_requested_for(job.run_dir)
                if returncode is not None:
                    self.active = None
                    if returncode != EXIT_DUPLICATE:  # a duplicate left the run to its live worker
                        self._record(f"the end of run '{job.run_dir.name}'", lambda: mark_dead_worker(
                            job.run_dir, None if returncode == -999 else returncode))
                elif waited is not None and waited > FORCE_STOP_AFTER_S:
                    self.active = None
                    self._record(f"the forced stop of run '{job.run_dir.name}'", lambda: kill_worker(
                        job.run_dir, job.pid, f"Stopped by force: the graceful stop took over "
                                              f"{FORCE_STOP_AFTER_S:.0f} s.", job.process))
            popped = False
            while self.active is None and self.queue:
                run_dir, resume = self.queue.popleft()
                popped = True
                try:
                    recorded = rundir.read_run_status(run_dir, derive=False)
                    if rundir.worker_alive(run_dir, recorded.pid):
                        continue  # started meanwhile by another dashboard sharing this runs folder
                    if recorded.state != "queued":
                        continue  # taken off the queue elsewhere (a stopped sweep, the CLI) since it was queued
                    process = spawn_worker(run_dir, resume=resume)
                except RunError as error:
                    self._record(f"why run '{run_dir.name}' did not start", functools.partial(
                        update_launch, run_dir, "failed", message="Not started.", error=str(error),
                        queue_position=None))
                    continue
                self.active = ActiveJob(run_dir=run_dir, process=process, pid=process.pid)
            if popped:
                self._record("the queue positions", self._refresh_queue_messages)

    def _refresh_queue_messages(self) -> None:
        for position, (run_dir, _) in enumerate(self.queue, start=1):
            update_launch(run_dir, "queued", message=f"Queued: position {position}, behind the running job.",
                          queue_position=position)

    # ------------------------------------------------------------------ restart recovery
    def recover(self) -> None:
        """Make the run directories tell the truth after a restart (see module docstring).

        A run whose files say it is active but whose worker is gone is recorded as
        interrupted; a live one (started by a CLI or another dashboard) is adopted if this
        manager has no job; queued runs are queued again. A folder that cannot be read or
        written, or whose status files are damaged, is left as its row in the runs table
        describes it: never restarted on a guess.
        """
        queued = []
        for summary in rundir.list_runs(self.runs_dir):
            try:
                status = rundir.read_run_status(summary.path)
            except OSError:
                continue
            if status.notes:  # damaged status files: never started again on a guess (it may have completed)
                continue
            if status.recorded_state is not None:
                self._record(f"that run '{summary.name}' was interrupted",
                             functools.partial(mark_dead_worker, summary.path, None, interrupted=True))
            elif status.active and self.active is None:
                pid = rundir.live_worker_pid(summary.path, status.pid) or status.pid
                self.active = ActiveJob(run_dir=summary.path, process=None, pid=pid)
            elif status.state == "queued":
                queued.append((status.updated_at or 0, summary.path))
        for _, run_dir in sorted(queued):
            self.queue.append((run_dir, rundir.latest_checkpoint(run_dir) is not None))

    # ------------------------------------------------------------------ reading
    def queue_names(self) -> list[str]:
        with self._lock:
            return [run_dir.name for run_dir, _ in self.queue]

    def active_name(self) -> str | None:
        with self._lock:
            return self.active.run_dir.name if self.active else None


def wait_for_state(run_dir: Path, states, timeout_s: float, poll_s: float = 0.2) -> str | None:
    """Block until the run reaches one of ``states`` (tests and the CLI use this)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = rundir.read_run_status(run_dir).state
        if state in states:
            return state
        time.sleep(poll_s)
    return rundir.read_run_status(run_dir).state
