"""The run directory: the one source of truth for a training run.

Layout (every reader — UI, CLI, tests — goes through this module)::

    runs/<name>/
      config.yaml      the fully resolved RunConfig, written before anything starts
      status.json      what the worker process says about itself (state, progress, fallbacks, error)
      launch.json      what the launcher (job manager or CLI) did and saw: created, queued, launched, died
      metrics.jsonl    one JSON object per log / eval event, appended by the worker
      gpu.jsonl        NVML (or process RAM) samples, appended by the worker's sampler thread
      train.log        the worker's stdout and stderr
      adapter/         the PEFT adapter + tokenizer, saved at the end or on stop
      checkpoints/     resumable Trainer checkpoints; each complete one holds ``.complete``
      lineage.json     base model, dataset hashes, package versions, git commit
      stop_request     present when a stop was asked for (by the UI, the CLI, anyone)
      ratings.jsonl    blind A/B ratings from the Chat tab
      .lock            held around every read-modify-write of status.json or launch.json
      worker.lock      held (fcntl) by the live worker for its whole life; names it inside
      .reserve         a little disk space set aside, freed to record a disk-full failure

Files are appended or replaced atomically, so a dashboard that restarts, a second
browser or the CLI all read the same story.

Status: one writer per fact, one reader
---------------------------------------
The worker, the job manager (a thread of the dashboard) and the CLI act on a run at the
same moments: the worker logs step 40 while the dashboard renumbers its queue and the CLI
kills a worker. When all three read-modify-wrote one file, the slower writer put back what
it had read and the other's update was lost (a stop message could put ``evaluating`` back
over ``completed``). So the facts are partitioned by who knows them:

* ``status.json`` is written only by the worker (``update_status``, ``add_fallback``):
  its state transitions, progress, messages, fallbacks and its own error.
* ``launch.json`` is written only from outside the worker (``update_launch``): when the
  run was created and queued, which process was launched, and what was observed when a
  worker died, was killed or was taken off the queue.
* ``stop_request`` stays its own file: asking is not a status, and the worker polls it.

Every read-modify-write of either file holds an ``fcntl`` lock on ``.lock`` (it excludes
threads and processes alike, and the kernel drops it if the holder is killed), so two
launchers writing ``launch.json`` at once cannot lose each other's update either. Each
write is stamped with a sequence number one above both files' last, and
``read_run_status`` merges the two files into one typed ``RunStatus``: state, message,
error and pid come from whichever side set a state last (the sequence orders them without
trusting wall clocks), progress from the worker, launch facts from the launcher, and the
history is both sides' transitions in order. A run directory from before the split (a
single ``status.json``) reads the same.

Crash consistency: what a reader believes, and why
--------------------------------------------------
A worker killed with ``kill -9`` (or by the OOM killer, or a power cut) writes nothing more,
so a recorded ``training`` can be a lie. Readers therefore trust facts that survive a crash:

* **Is the worker alive?** The worker holds an ``fcntl`` lock on ``worker.lock`` from its
  first instant to its last; the kernel drops it when the process dies, however it dies.
  A reader that can take the lock (shared, non-blocking, released at once) knows no worker
  is running. In the short window before a new worker takes the lock, the launcher's
  recorded pid is checked instead (``psutil``, command line included, so a reused pid is
  not mistaken for it). A recorded active state without a live worker reads as
  ``interrupted``, with the last step and where resume continues, whoever started the run
  and whether or not any dashboard was watching.
* **Which checkpoint can resume?** Only a complete one: the worker's ``on_save`` callback
  writes ``.complete`` into ``checkpoint-N`` after transformers has written every file (and
  flushed them), so a folder cut short by a kill or a full disk is never offered.
* **Which metrics are current?** A resume appends ``{"event": "resume", "step": S}`` to
  metrics.jsonl; ``current_records`` drops every earlier record above step S (those steps
  were rolled back and trained again), so charts never run backwards.
* **A full disk** fails the run with a sentence naming the disk and its free bytes, written
  into status.json with the space of ``.reserve`` (freed just for that), not only into a log
  that may be cut.

Readers never fail on a damaged entry: a status file that is not JSON, a field of the
wrong type, a config that is not a mapping, a NUL line in gpu.jsonl or an unreadable
folder each become a one-line note on that run (``RunStatus.notes``, ``RunSummary.notes``)
and the list goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil

from engine.errors import RunError
from engine.limits import limits, size_text
from engine.names import check_name, name_problem

STATES = ("queued", "loading", "training", "evaluating", "saving", "completed", "stopped", "failed", "interrupted")
TERMINAL_STATES = ("completed", "stopped", "failed", "interrupted")
ACTIVE_STATES = ("loading", "training", "evaluating", "saving")
STOP_REQUESTED_MESSAGE = "Stop requested: finishing the current step."
CHECKPOINT_COMPLETE = ".complete"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    status = property(lambda self: self.root / "status.json")
    launch = property(lambda self: self.root / "launch.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    gpu = property(lambda self: self.root / "gpu.jsonl")
    log = property(lambda self: self.root / "train.log")
    adapter = property(lambda self: self.root / "adapter")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lineage = property(lambda self: self.root / "lineage.json")
    stop_request = property(lambda self: self.root / "stop_request")
    ratings = property(lambda self: self.root / "ratings.jsonl")
    lock = property(lambda self: self.root / ".lock")
    worker_lock = property(lambda self: self.root / "worker.lock")
    reserve = property(lambda self: self.root / ".reserve")
    trackers = property(lambda self: self.root / "trackers.json")  # where tracker copies went (trackers.py)


# ----------------------------------------------------------------------------- small file helpers
def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader sees the old file or the new, never half.

    The temporary name is per process and thread, so two writers never share one; a write
    that fails (a full disk) removes its temporary file and leaves the old file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, default=None):
    """A JSON object from ``path``, or ``default`` when it is missing, unreadable, damaged or not an object."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError (NUL bytes, binary)
        return default
    return data if isinstance(data, dict) else default


def append_jsonl(path: Path, record: dict) -> None:
    """One line per write, flushed: a reader never sees half a record except the last line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()


def _read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict], int, int, str | None]:
    """(records, next offset, damaged lines, a note when the file cannot be read at all)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset, 0, None
    except OSError as error:
        return [], offset, 0, f"{Path(path).name} is unreadable: {_reason(error)}"
    records, consumed, damaged = [], 0, 0
    for line in chunk.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not text at all (a NUL line is a UnicodeDecodeError)
            damaged += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged += 1
    return records, offset + consumed, damaged, None


def read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Records from byte ``offset`` on, and the offset to continue from.

    A trailing partial line (a writer mid-append) is left for the next call, so a
    polling UI reads each record exactly once and never re-reads the whole file. Lines
    that are not a JSON object (damage, NUL bytes) are skipped, never fatal.
    """
    records, offset, _, _ = _read_jsonl(path, offset)
    return records, offset


def _reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or str(error)).lower()


# ----------------------------------------------------------------------------- disk space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Below this, a write that failed without an errno (torch's "file write failed") is taken as a full disk.
DISK_FULL_MARGIN_BYTES = 2**20


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, device, filesystem type) of the filesystem holding ``path``."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device, fstype = "?", "?"
    try:
        for partition in psutil.disk_partitions(all=True):
            if partition.mountpoint == str(mount):
                device, fstype = partition.device, partition.fstype
    except (OSError, RuntimeError):
        pass
    return str(mount), device, fstype


def disk_full_sentence(path: Path, doing: str = "") -> str:
    """'The disk holding PATH (tmpfs "tmpfs" mounted at /x) is full: 0 bytes free of 31,457,280 bytes (30.0 MiB).'"""
    path = Path(path)
    mount, device, fstype = _mount_of(path)
    try:
        usage = shutil.disk_usage(mount)
        free = f"{size_text(usage.free)} free of {size_text(usage.total)}"
    except OSError:
        free = "free space unknown"
    what = f" while {doing}" if doing else ""
    return f"The disk holding {path} ({fstype} '{device}' mounted at {mount}) was full{what}: {free}."


def is_disk_full(error: BaseException, path: Path | None = None) -> bool:
    """Whether ``error`` (or anything in its cause chain) is a full disk or quota.

    Some writers lose the errno (torch.save raises RuntimeError "file write failed"); then a
    nearly full filesystem under ``path`` is taken as the reason.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if "no space left on device" in str(error).lower() or "disk quota exceeded" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    if path is not None:
        try:
            return shutil.disk_usage(_mount_of(Path(path))[0]).free < DISK_FULL_MARGIN_BYTES
        except OSError:
            return False
    return False


def ensure_reserve(run_dir: Path) -> None:
    """Set aside ``limits().disk_reserve_bytes`` in the run folder (really allocated, not sparse)."""
    path = RunPaths(Path(run_dir)).reserve
    size = limits().disk_reserve_bytes
    try:
        if path.stat().st_size >= size:
            return
    except FileNotFoundError:
        pass
    try:
        with open(path, "wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as error:
                if error.errno in DISK_FULL_ERRNOS:
                    raise
                handle.write(b"\0" * size)  # a filesystem without fallocate: zeros take the space
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def release_reserve(run_dir: Path) -> bool:
    """Free the run's reserve so a disk-full failure can still be recorded; whether there was one."""
    try:
        RunPaths(Path(run_dir)).reserve.unlink()
        return True
    except OSError:
        return False


def write_despite_full_disk(run_dir: Path, write) -> None:
    """Call ``write()``; if the disk is full, free the run's reserve and call it once more."""
    try:
        write()
    except OSError as error:
        if not is_disk_full(error) or not release_reserve(run_dir):
            raise
        write()


# ----------------------------------------------------------------------------- is the worker alive?
def worker_lock_held(run_dir: Path) -> bool | None:
    """True while a worker holds ``worker.lock``; False when none does; None when it cannot be told."""
    try:
        fd = os.open(RunPaths(Path(run_dir)).worker_lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        # Shared and non-blocking: readers never exclude each other, and never wait on a worker.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def worker_lock_holder(run_dir: Path) -> dict:
    """What the live worker wrote into ``worker.lock`` (pid, since); {} when nothing readable."""
    return read_json(RunPaths(Path(run_dir)).worker_lock, default={}) or {}


def pid_is_worker_of(run_dir: Path, pid: int | None) -> bool:
    """Whether ``pid`` is a running (not zombie) worker process of this run; a reused pid is not."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # The worker itself, or the launcher of a multi-GPU run (engine.training.launch), which leads its ranks.
    return ("engine.training.worker" in cmdline or "engine.training.launch" in cmdline) and \
        Path(run_dir).name in cmdline


def worker_alive(run_dir: Path, pid: int | None = None) -> bool:
    """Whether this run has a live worker: its lock is held, or (before it takes the lock) ``pid`` is it."""
    if worker_lock_held(run_dir):
        return True
    return pid_is_worker_of(run_dir, pid)


def live_worker_pid(run_dir: Path, recorded_pid: int | None = None) -> int | None:
    """The pid to signal: the lock holder's own word first, else the recorded pid if it is the worker."""
    if worker_lock_held(run_dir):
        pid = worker_lock_holder(run_dir).get("pid")
        if isinstance(pid, int) and pid > 0:
            return pid
    return recorded_pid if pid_is_worker_of(run_dir, recorded_pid) else None


def take_worker_lock(run_dir: Path, wait_s: float = 5.0, pid: int | None = None):
    """The worker's lock on its run, held for as long as the returned file stays open (the process's life).

    Readers take the lock shared for an instant to probe it, so a busy probe is retried for
    ``wait_s``; a lock still held after that belongs to another live worker of this run,
    and ``RunError`` says so (two workers must never write one run).
    """
    path = RunPaths(Path(run_dir)).worker_lock
    handle = open(path, "a+", encoding="utf-8")
    deadline = time.time() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > deadline:
                holder = worker_lock_holder(run_dir).get("pid")
                handle.close()
                raise RunError(f"Run '{Path(run_dir).name}' already has a live worker (pid {holder}); "
                               "a second one was not started.") from None
            time.sleep(0.02)
    try:
        handle.seek(0)
        handle.truncate()
        # ``pid``: the process to signal when it is not this one (a multi-GPU run's launcher).
        handle.write(json.dumps({"pid": pid or os.getpid(), "since": time.time()}))
        handle.flush()
    except OSError:
        pass  # the lock is what matters; its note is a courtesy (a full disk must not stop the worker here)
    return handle


@contextmanager
def hold_worker_lock(run_dir: Path, wait_s: float = 5.0):
    """``take_worker_lock`` for a block (tests play a live worker this way)."""
    handle = take_worker_lock(run_dir, wait_s)
    try:
        yield
    finally:
        handle.close()  # releases the lock; a killed process releases it too


# ----------------------------------------------------------------------------- status: the typed view
@dataclass
class RunStatus:
    """Everything known about a run's progress, merged from status.json and launch.json."""

    state: str = "unknown"
    message: str = ""
    error: str | None = None
    history: list[dict] = field(default_factory=list)  # [{"state", "t", "seq"}], both writers, in order
    pid: int | None = None
    # progress (the worker's)
    step: int = 0
    max_steps: int | None = None
    eta_s: float | None = None
    fallbacks: list[str] = field(default_factory=list)
    baseline_eval_loss: float | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    linear4bit_layers: int | None = None
    train_runtime_s: float | None = None
    tokens_seen: int | None = None
    task_metric: str | None = None  # engine.training.task_eval: the metric, its latest and its step-0 score
    task_score: float | None = None
    baseline_task_score: float | None = None
    kept_step: int | None = None  # early stopping: the step whose checkpoint became the adapter
    processes: int | None = None  # a multi-GPU run's processes in all (tokens and batches count all of them)
    # launch facts (the launcher's)
    created_at: float | None = None
    worker_started_at: float | None = None
    queue_position: int | None = None
    sweep: str | None = None  # the sweep (engine.sweeps) this run belongs to
    # derived when read
    started_at: float | None = None
    ended_at: float | None = None
    updated_at: float | None = None
    stop_requested: bool = False
    recorded_state: str | None = None  # set when the files say active but no worker is alive
    notes: list[str] = field(default_factory=list)  # damaged entries, one line each
    extra: dict = field(default_factory=dict)  # keys a newer or older writer added; kept, not interpreted

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    def as_dict(self) -> dict:
        """The JSON shape ``read_status`` has always returned: unknown values are left out."""
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "notes") and v is not None}
        if self.notes:
            data["notes"] = list(self.notes)
        data.update(self.extra)
        return data


# Which file owns which fact. ``state``, ``message``, ``error`` and ``pid`` exist on both
# sides (each side's own account); the merge takes them from the side that set a state last.
SHARED_FIELDS = ("state", "message", "error", "pid")
WORKER_FIELDS = SHARED_FIELDS + ("step", "max_steps", "eta_s", "fallbacks", "baseline_eval_loss",
                                 "trainable_parameters", "total_parameters", "linear4bit_layers",
                                 "train_runtime_s", "tokens_seen", "task_metric", "task_score",
                                 "baseline_task_score", "kept_step", "processes")
LAUNCHER_FIELDS = SHARED_FIELDS + ("created_at", "worker_started_at", "queue_position", "sweep")
_BOOKKEEPING = ("history", "seq", "state_seq", "updated_at", "started_at", "ended_at")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# What each recorded field must be; a value of another type is dropped with a note (None is always allowed).
_FIELD_RULES = {
    "state": (lambda v: v in STATES, f"one of {', '.join(STATES)}"),
    "message": (lambda v: isinstance(v, str), "text"),
    "error": (lambda v: isinstance(v, str), "text"),
    "pid": (lambda v: _is_int(v) and v > 0, "a process id"),
    "step": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "max_steps": (_is_int, "a whole number"),
    "eta_s": (_is_number, "a number"),
    "fallbacks": (_is_text_list, "a list of sentences"),
    "baseline_eval_loss": (_is_number, "a number"),
    "trainable_parameters": (_is_int, "a whole number"),
    "total_parameters": (_is_int, "a whole number"),
    "linear4bit_layers": (_is_int, "a whole number"),
    "train_runtime_s": (_is_number, "a number"),
    "tokens_seen": (_is_int, "a whole number"),
    "kept_step": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "processes": (lambda v: _is_int(v) and v >= 1, "a positive whole number"),
    "sweep": (lambda v: isinstance(v, str), "text"),
    "created_at": (_is_number, "a time"),
    "worker_started_at": (_is_number, "a time"),
    "queue_position": (_is_int, "a whole number"),
    "history": (lambda v: isinstance(v, list), "a list"),
    "seq": (_is_number, "a number"),
    "state_seq": (_is_number, "a number"),
    "updated_at": (_is_number, "a time"),
    "started_at": (_is_number, "a time"),
    "ended_at": (_is_number, "a time"),
}


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_side(path: Path) -> tuple[dict, list[str]]:
    """One status file as a clean dict, and a note for everything that had to be left out."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, []
    except OSError as error:
        return {}, [f"{path.name} is unreadable: {_reason(error)}"]
    if not raw.strip():
        return {}, [f"{path.name} is empty"]
    try:
        data = json.loads(raw)
    except ValueError:
        return {}, [f"{path.name} is not valid JSON"]
    if not isinstance(data, dict):
        return {}, [f"{path.name} is not a JSON object (it holds a {type(data).__name__})"]
    notes = []
    for key, (ok, what) in _FIELD_RULES.items():
        value = data.get(key)
        if value is not None and not ok(value):
            notes.append(f"{path.name}: {key} is {_short(value)}, not {what}")
            del data[key]
    history = [h for h in data.get("history", []) if isinstance(h, dict) and h.get("state") in STATES
               and _is_number(h.get("t", 0)) and _is_number(h.get("seq", -1))]
    if len(history) != len(data.get("history", [])):
        notes.append(f"{path.name}: {len(data['history']) - len(history)} damaged history entries left out")
    if "history" in data:
        data["history"] = history
    return data, notes


def _merge(worker: dict, launcher: dict, stop_requested: bool) -> RunStatus:
    """One view of both files; pure, so the writers use it under the lock and readers without."""
    # The side that set a state last speaks for the run; a write without a state never takes over.
    owner, other = (launcher, worker) if launcher.get("state_seq", -1) > worker.get("state_seq", -1) \
        else (worker, launcher)
    history = sorted(worker.get("history", []) + launcher.get("history", []),
                     key=lambda h: (h.get("seq", -1), h.get("t", 0)))
    merged_history: list[dict] = []
    for entry in history:  # the launcher's "loading" followed by the worker's own is one transition
        if not merged_history or merged_history[-1]["state"] != entry["state"]:
            merged_history.append(entry)
    state = owner.get("state") or other.get("state") or "unknown"
    known = {f.name for f in fields(RunStatus)}
    status = RunStatus(
        state=state,
        message=owner.get("message") or "",
        error=owner.get("error"),
        history=merged_history,
        pid=owner.get("pid") or other.get("pid"),
        **{name: worker[name] for name in WORKER_FIELDS if name not in SHARED_FIELDS and worker.get(name) is not None},
        created_at=launcher.get("created_at") or worker.get("created_at"),  # before the split: in status.json
        worker_started_at=launcher.get("worker_started_at") or worker.get("worker_started_at"),
        queue_position=launcher.get("queue_position") if state == "queued" else None,
        sweep=launcher.get("sweep"),
        updated_at=max(worker.get("updated_at") or 0, launcher.get("updated_at") or 0) or None,
        stop_requested=stop_requested,
        extra={k: v for side in (launcher, worker) for k, v in side.items()
               if k not in known and k not in _BOOKKEEPING},
    )
    active_times = [h["t"] for h in merged_history if h["state"] in ACTIVE_STATES and "t" in h]
    status.started_at = active_times[0] if active_times else worker.get("started_at")
    if state in TERMINAL_STATES:
        status.ended_at = merged_history[-1].get("t") if merged_history else worker.get("ended_at")
    if stop_requested and state in ("loading", "training", "evaluating"):
        status.message = STOP_REQUESTED_MESSAGE  # until the worker answers with "saving"
    return status


def _read_sides(paths: RunPaths) -> tuple[dict, dict, list[str]]:
    worker, worker_notes = _read_side(paths.status)
    launcher, launcher_notes = _read_side(paths.launch)
    return worker, launcher, worker_notes + launcher_notes


def resume_hint(run_dir: Path) -> str:
    """Where a resume would continue, as the end of a sentence."""
    checkpoint = latest_checkpoint(run_dir)
    return (f" Resume continues from {checkpoint.name}." if checkpoint else
            " No complete checkpoint was saved, so resume starts over.")


def read_run_status(run_dir: Path, derive: bool = True) -> RunStatus:
    """The typed status of a run; never blocks on the lock (both files are replaced atomically).

    With ``derive`` (readers), a recorded active state whose worker is gone reads as
    ``interrupted`` (``recorded_state`` keeps what the files say). Writers decide on the
    recorded state alone (``derive=False``).
    """
    paths = RunPaths(Path(run_dir))
    worker, launcher, notes = _read_sides(paths)
    try:
        stop_requested = paths.stop_request.exists()
    except OSError:
        stop_requested = False
    status = _merge(worker, launcher, stop_requested)
    status.notes = notes
    if derive and status.active and status.pid is not None and not worker_alive(run_dir, status.pid):
        status.recorded_state, status.state = status.state, "interrupted"
        status.message = "Interrupted."
        status.error = (f"The worker process (pid {status.pid}) is no longer running and did not record how it "
                        f"ended (killed with kill -9 or by the out-of-memory killer, or the machine restarted); "
                        f"last step {status.step}." + resume_hint(run_dir))
        status.eta_s = None
        status.ended_at = status.updated_at
    return status


def read_status(run_dir: Path) -> dict:
    """``read_run_status`` as a plain dict (what ``python -m engine show`` prints)."""
    return read_run_status(run_dir).as_dict()


@contextmanager
def run_lock(run_dir: Path):
    """Exclusive lock for a read-modify-write of the run's status files (threads and processes)."""
    with open(RunPaths(Path(run_dir)).lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_side(run_dir: Path, side: str, state: str | None, values: dict, allowed: tuple,
                change=None) -> None:
    """Apply one writer's update to its own file; call with ``run_lock`` held."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    wrong = sorted(set(values) - set(allowed))
    if wrong:
        raise ValueError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not written by the {side} "
                         f"(it writes {', '.join(allowed)}).")
    paths = RunPaths(Path(run_dir))
    worker, launcher, _ = _read_sides(paths)  # a damaged file is rewritten clean by its writer
    mine = worker if side == "worker" else launcher
    now, seq = time.time(), max(worker.get("seq", 0), launcher.get("seq", 0)) + 1
    if state is not None:
        if _merge(worker, launcher, False).state != state:
            mine.setdefault("history", []).append({"state": state, "t": now, "seq": seq})
        mine["state"], mine["state_seq"] = state, seq
    mine.update(values)
    if change is not None:
        change(mine)
    mine["seq"], mine["updated_at"] = seq, now
    target = paths.status if side == "worker" else paths.launch
    # A full disk must not silence the run: the reserve is freed to record this write.
    write_despite_full_disk(run_dir, lambda: write_json_atomic(target, mine))


def update_status(run_dir: Path, state: str | None = None, **values) -> None:
    """The worker's writer: its state, progress and messages, into status.json.

    Only the worker process calls this (tests call it to play a worker). A new ``state``
    is recorded in the history when it changes what a reader sees.
    """
    with run_lock(run_dir):
        _write_side(run_dir, "worker", state, values, WORKER_FIELDS)


def add_fallback(run_dir: Path, sentence: str) -> None:
    """Record a setting the worker could not honour, in words, once."""

    def append(mine: dict) -> None:
        if sentence not in mine.setdefault("fallbacks", []):
            mine["fallbacks"].append(sentence)

    with run_lock(run_dir):
        _write_side(run_dir, "worker", None, {}, WORKER_FIELDS, change=append)


def update_launch(run_dir: Path, state: str | None = None, unless_ended: bool = False, **values) -> bool:
    """The launcher's writer (job manager, CLI): launch facts and what it observed, into launch.json.

    ``unless_ended``: write only if the run has not already reached a final state, decided
    under the lock, so a worker that finished by itself is never overwritten by a launcher
    that saw it go (and two launchers that both saw a death record it once). Returns
    whether it wrote.
    """
    with run_lock(run_dir):
        if unless_ended and read_run_status(run_dir, derive=False).ended:
            return False
        _write_side(run_dir, "launcher", state, values, LAUNCHER_FIELDS)
    return True


# ----------------------------------------------------------------------------- creating and finding runs
def safe_run_dir(runs_dir: Path, name: str) -> Path:
    """The folder of run ``name``, refusing anything that could leave ``runs_dir``."""
    return Path(runs_dir) / check_name(name, "run", RunError)


def create_run(runs_dir: Path, config, name: str | None = None) -> Path:
    """Make the run folder, write the resolved config and a ``queued`` status.

    All or nothing: if any of it cannot be written (a full disk, a read-only folder), the
    half-made folder is removed and ``RunError`` says why, naming the disk when it is full.
    """
    runs_dir = Path(runs_dir)
    base = name or config.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}"
    run_dir = None
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        check_name(base, "run", RunError)
        candidate, counter = base, 1
        while True:
            run_dir = safe_run_dir(runs_dir, candidate)
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                counter += 1
                candidate = f"{base}-{counter}"
        config.name = candidate
        write_text_atomic(RunPaths(run_dir).config, config.to_yaml())
        write_launch_files(run_dir, config)
        ensure_reserve(run_dir)
        update_launch(run_dir, "queued", created_at=time.time(), message="Waiting to start.")
    except OSError as error:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if is_disk_full(error):
            raise RunError("The run was not created. " + disk_full_sentence(runs_dir) +
                           " Free some space there (old runs, exports) and start it again.") from None
        raise RunError(f"The run was not created: {runs_dir} cannot be written ({_reason(error)}).") from None
    return run_dir


def write_launch_files(run_dir: Path, config) -> list[Path]:
    """A multi-GPU run's accelerate config and each machine's launch command, in ``accelerate/`` (none otherwise)."""
    if config.distributed.strategy == "none":
        return []
    from engine import PROJECT_ROOT
    from engine.config.build import write_accelerate_files

    return write_accelerate_files(config, run_dir, PROJECT_ROOT)


def resolve_run(runs_dir: Path, name_or_path: str, allow_path: bool = False) -> Path:
    """The folder of run ``name_or_path`` inside ``runs_dir``.

    Run fields in the dashboard take run names only (``allow_path=False``), so nothing typed
    there reaches a folder outside the runs folder. Command lines may also name a run folder
    by its path (``allow_path=True``), as a person at a shell could open it anyway.
    """
    text = str(name_or_path or "").strip()
    if allow_path and name_problem(text) is not None:
        path = Path(text).expanduser()
        if path.is_dir() and (path / "config.yaml").exists():
            return path
    run_dir = safe_run_dir(runs_dir, text)
    try:
        found = (run_dir / "config.yaml").exists()
    except OSError as error:
        raise RunError(f"Run '{text}' in {runs_dir} is unreadable: {_reason(error)}.") from None
    if not found:
        raise RunError(f"No run named '{text}' in {runs_dir}.")
    return run_dir


# ----------------------------------------------------------------------------- adapters and checkpoints
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"


def has_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a loadable PEFT adapter: its config and its weights."""
    folder = Path(folder)
    try:
        return (folder / "adapter_config.json").is_file() and any((folder / name).is_file() for name in ADAPTER_WEIGHTS)
    except OSError:
        return False


def _checkpoint_step(path: Path) -> int | None:
    tail = path.name.split("-")[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def checkpoint_complete(folder: Path) -> bool:
    """Whether a ``checkpoint-N`` folder can be resumed from.

    Complete means the worker's ``on_save`` marked it (``.complete``, written after every file
    was flushed). A folder without the mark still counts when its ``trainer_state.json`` — the
    last file transformers writes — is whole and names step N: that covers a kill in the instant
    between transformers' last write and the mark, and runs from before the mark existed.
    """
    folder = Path(folder)
    try:
        if (folder / CHECKPOINT_COMPLETE).is_file():
            return True
        state = read_json(folder / TRAINER_STATE, default=None)
    except OSError:
        return False
    return isinstance(state, dict) and state.get("global_step") == _checkpoint_step(folder)


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    try:
        found = [p for p in RunPaths(Path(run_dir)).checkpoints.glob("checkpoint-*")
                 if _checkpoint_step(p) is not None and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=_checkpoint_step)


def checkpoints(run_dir: Path, adapters_only: bool = False) -> list[Path]:
    """The run's complete ``checkpoints/checkpoint-N`` folders, oldest step first."""
    return [p for p in _checkpoint_folders(run_dir)
            if checkpoint_complete(p) and (not adapters_only or has_adapter(p))]


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders cut short (a kill or a full disk mid-save): never resumed from."""
    return [p for p in _checkpoint_folders(run_dir) if not checkpoint_complete(p)]


def mark_checkpoint_complete(folder: Path) -> None:
    """Flush every file of a saved checkpoint to disk, then write its ``.complete`` mark last."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    write_json_atomic(folder / CHECKPOINT_COMPLETE, {"step": _checkpoint_step(folder), "t": time.time()})
    try:  # the rename of the mark itself survives a power cut only once the folder is flushed
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_incomplete_checkpoints(run_dir: Path) -> list[str]:
    """Delete checkpoint folders that were cut short; their names, for the sentence that says so."""
    removed = []
    for folder in incomplete_checkpoints(run_dir):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from: the newest complete one."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def latest_adapter(run_dir: Path) -> Path | None:
    """adapter/ once the run has ended (it is the final save); while it runs, the newest checkpoint.

    Decided by state and step, not file times: copying a run folder resets those.
    """
    adapter, saved = RunPaths(Path(run_dir)).adapter, checkpoints(run_dir, adapters_only=True)
    if has_adapter(adapter) and (read_run_status(run_dir).ended or not saved):
        return adapter
    return saved[-1] if saved else None


# ----------------------------------------------------------------------------- metrics and memory samples
_METRIC_NUMBERS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", "eta_s",
                   "t", "epoch", "tokens_seen", "eval_runtime_s")


def clean_metric(record: dict) -> dict | None:
    """A metrics record readers can trust: a whole-number step, numbers where numbers belong; None if hopeless."""
    step = record.get("step")
    whole = isinstance(step, float) and math.isfinite(step) and step.is_integer()
    if not (_is_int(step) or whole) or step < 0:
        return None
    bad = [key for key in _METRIC_NUMBERS if record.get(key) is not None
           and not (isinstance(record[key], (int, float)) and not isinstance(record[key], bool))]
    if bad or whole:
        record = {**record, "step": int(step), **{key: None for key in bad}}
    return record


def clean_sample(sample: dict) -> dict | None:
    """A gpu.jsonl sample readers can trust (a time, a list of devices with an index), or None."""
    when = sample.get("t")
    if not _is_number(when) or not 0 <= when < 1e11:
        return None
    devices = sample.get("devices")
    good = [d for d in devices if isinstance(d, dict) and _is_int(d.get("index"))] if isinstance(devices, list) else []
    process_bytes = sample.get("process_bytes")
    if good != devices or (process_bytes is not None and not _is_number(process_bytes)):
        sample = {**sample, "devices": good, "process_bytes": process_bytes if _is_number(process_bytes) else None}
    return sample


def is_resume(record: dict) -> bool:
    return record.get("event") == "resume"


def current_records(records: list[dict]) -> list[dict]:
    """Metrics with rolled-back steps dropped: after ``{"event": "resume", "step": S}``, every
    earlier record above step S is gone (those steps were trained again), so steps never run backwards."""
    kept: list[dict] = []
    for record in records:
        step = record.get("step")
        if is_resume(record) and _is_number(step):
            while kept and _is_number(kept[-1].get("step")) and kept[-1]["step"] > step:
                kept.pop()
        kept.append(record)
    return kept


def resume_record(step: int, checkpoint: str | None) -> dict:
    """The metrics line a resumed worker appends before its first new step."""
    return {"event": "resume", "step": int(step), "checkpoint": checkpoint, "t": time.time()}


def _metrics_of(path: Path) -> tuple[list[dict], int, str | None]:
    records, _, damaged, note = _read_jsonl(path)
    cleaned = [clean_metric(r) for r in records]
    damaged += sum(1 for r in cleaned if r is None)
    return current_records([r for r in cleaned if r is not None]), damaged, note


def _samples_of(path: Path) -> tuple[list[dict], int, str | None]:
    records, _, damaged, note = _read_jsonl(path)
    cleaned = [clean_sample(r) for r in records]
    damaged += sum(1 for r in cleaned if r is None)
    return [r for r in cleaned if r is not None], damaged, note


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's current metrics (damaged lines and rolled-back steps left out)."""
    return _metrics_of(RunPaths(Path(run_dir)).metrics)[0]


def read_gpu_samples(run_dir: Path) -> list[dict]:
    return _samples_of(RunPaths(Path(run_dir)).gpu)[0]


def load_config(run_dir: Path):
    from engine.config import RunConfig

    return RunConfig.from_yaml(RunPaths(Path(run_dir)).config)


def peak_memory(samples: list[dict], per_gpu: bool = False) -> tuple[int | None, str | None]:
    """Largest memory used by the training process (NVML per-process, else device used, else RSS).

    ``per_gpu``: a multi-GPU run's largest share of any one GPU (what the per-GPU prediction is), when
    NVML gave per-device shares; else as above."""
    peak, source = None, None
    for sample in samples:
        value = sample.get("process_bytes")
        if per_gpu:
            shares = [d.get("process_bytes") for d in sample.get("devices") or [] if isinstance(d, dict)]
            value = max((v for v in shares if _is_number(v)), default=value)
        if not _is_number(value) and sample.get("devices"):
            used = [d.get("used_bytes") for d in sample["devices"] if isinstance(d, dict)]
            value = max((u for u in used if _is_number(u)), default=None)
        if _is_number(value) and (peak is None or value > peak):
            peak, source = value, sample.get("source")
    return peak, source


# ----------------------------------------------------------------------------- reading a run
@dataclass
class RunSummary:
    """What the runs table shows; everything is read from the run directory."""

    name: str
    path: Path
    state: str
    method: str
    base_model: str
    step: int
    max_steps: int | None
    train_loss: float | None
    eval_loss: float | None
    baseline_eval_loss: float | None
    peak_memory_bytes: int | None
    memory_source: str | None
    duration_s: float | None
    created_at: float | None
    message: str = ""
    error: str | None = None
    fallbacks: list = field(default_factory=list)
    has_adapter: bool = False
    task_metric: str | None = None  # the latest task_eval event of metrics.jsonl (engine.training.task_eval)
    task_score: float | None = None
    notes: list = field(default_factory=list)  # what is damaged or unreadable in this folder, one line each
    overfit: object | None = None  # engine.training.overfit.OverfitAlarm when the alarm is raised

    @property
    def note(self) -> str:
        """The notes as one line for a table cell."""
        text = "; ".join(self.notes)
        return text if len(text) <= 160 else text[:159] + "…"

    def as_row(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "base model": self.base_model,
            "status": self.state,
            "steps": f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step),
            "train loss": None if not _is_number(self.train_loss) else round(self.train_loss, 4),
            "eval loss": None if not _is_number(self.eval_loss) else round(self.eval_loss, 4),
            "task score": None if not _is_number(self.task_score) else f"{self.task_metric} {self.task_score:.3f}",
            "peak memory (MiB)": None if self.peak_memory_bytes is None else round(self.peak_memory_bytes / 2**20),
            "duration (s)": None if self.duration_s is None else round(self.duration_s),
            "overfitting": self.overfit.cell if self.overfit is not None else "",
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created_at)) if self.created_at else "",
            "note": self.note,
        }


def _method_of(config: dict) -> str:
    """RunConfig.method (its one owner) for a config read leniently; '?' when the config is damaged."""
    from engine.config import RunConfig
    from engine.errors import LoraLabError

    try:
        return RunConfig.from_dict(config).method
    except (LoraLabError, TypeError, ValueError, AttributeError):
        return "?"


def read_config_dict(run_dir: Path) -> tuple[dict, str | None]:
    """config.yaml as a plain mapping, leniently; ({}, a note) when it is missing, unreadable or damaged."""
    import yaml

    path = RunPaths(Path(run_dir)).config
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, "config.yaml is missing"
    except UnicodeDecodeError:
        return {}, "config.yaml is not UTF-8 text"
    except OSError as error:
        return {}, f"config.yaml is unreadable: {_reason(error)}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        return {}, "config.yaml is not valid YAML" + (f" (line {mark.line + 1})" if mark else "")
    if data is None:
        return {}, "config.yaml is empty"
    if not isinstance(data, dict):
        return {}, f"config.yaml is not a mapping (it holds a {type(data).__name__})"
    return data, None


def _file_facts(run_dir: Path) -> dict:
    """The costly part of a summary: parsed config, metrics and memory samples, and notes on damage."""
    paths = RunPaths(run_dir)
    notes = []
    config, note = read_config_dict(run_dir)
    notes += [note] if note else []
    metrics, damaged_metrics, note = _metrics_of(paths.metrics)
    notes += [note] if note else []
    samples, damaged_samples, note = _samples_of(paths.gpu)
    notes += [note] if note else []
    for name, count in (("metrics.jsonl", damaged_metrics), ("gpu.jsonl", damaged_samples)):
        if count:
            notes.append(f"{name} has {count} damaged line{'s' if count != 1 else ''} (skipped)")
    train_losses = [m["loss"] for m in metrics if _is_number(m.get("loss"))]
    eval_losses = [m["eval_loss"] for m in metrics if _is_number(m.get("eval_loss")) and m.get("step", 0) > 0]
    task_evals = [m for m in metrics if m.get("event") == "task_eval" and _is_number(m.get("score"))]
    peak, source = peak_memory(samples)
    from engine.training.overfit import alarm_settings, overfit_alarm

    patience, watched, greater = alarm_settings(config)
    steps = [_checkpoint_step(path) for path in checkpoints(run_dir)]
    overfit = overfit_alarm(metrics, patience, watched, greater, [s for s in steps if s is not None])
    model = config.get("model")
    base = model.get("name_or_path") if isinstance(model, dict) else None
    return {"method": _method_of(config) if config else "?", "base_model": base if isinstance(base, str) else "?",
            "train_loss": train_losses[-1] if train_losses else None,
            "eval_loss": eval_losses[-1] if eval_losses else None,
            "peak_memory_bytes": peak, "memory_source": source, "notes": notes,
            "task_metric": task_evals[-1].get("metric") if task_evals else None,
            "task_score": task_evals[-1]["score"] if task_evals else None, "overfit": overfit}


_facts_cache: dict[Path, tuple[tuple, dict]] = {}
_facts_lock = threading.Lock()


def _signature(run_dir: Path) -> tuple:
    signature = []
    for path in (RunPaths(run_dir).metrics, RunPaths(run_dir).gpu, RunPaths(run_dir).config):
        try:
            stat = path.stat()
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except OSError:
            signature.append(None)
    return tuple(signature)


def unreadable_summary(run_dir: Path, note: str) -> RunSummary:
    """A row for a run folder that could not be read at all: its name and why."""
    return RunSummary(name=Path(run_dir).name, path=Path(run_dir), state="unknown", method="?", base_model="?",
                      step=0, max_steps=None, train_loss=None, eval_loss=None, baseline_eval_loss=None,
                      peak_memory_bytes=None, memory_source=None, duration_s=None, created_at=None,
                      message=note, notes=[note])


def summarize_run(run_dir: Path, cached: bool = False) -> RunSummary:
    """One row of the runs table; never raises for a damaged or unreadable folder (the row says why).

    The status is read fresh every time (it is small), so the table can never show an
    older state than the header beside it; with ``cached`` only the parsed metrics, memory
    samples and config are reused until one of those files changes (the runs table polls).
    """
    run_dir = Path(run_dir)
    try:
        if cached:
            signature = _signature(run_dir)
            with _facts_lock:
                hit = _facts_cache.get(run_dir)
            if hit is None or hit[0] != signature:
                hit = (signature, _file_facts(run_dir))
                with _facts_lock:
                    _facts_cache[run_dir] = hit
            facts = dict(hit[1])
        else:
            facts = _file_facts(run_dir)
        status = read_run_status(run_dir)
    except OSError as error:
        return unreadable_summary(run_dir, f"unreadable: {_reason(error)}")
    except Exception as error:  # noqa: BLE001 - one strange folder must never cost the whole list
        return unreadable_summary(run_dir, f"could not be read ({type(error).__name__}: {str(error)[:80]})")
    facts["notes"] = status.notes + facts["notes"]
    ended = status.ended_at or (time.time() if status.active else None)
    return RunSummary(
        name=run_dir.name,
        path=run_dir,
        state=status.state,
        step=status.step,
        max_steps=status.max_steps,
        baseline_eval_loss=status.baseline_eval_loss,
        duration_s=(ended - status.started_at) if status.started_at and ended else None,
        created_at=status.created_at,
        message=status.message,
        error=status.error,
        fallbacks=status.fallbacks,
        has_adapter=has_adapter(RunPaths(run_dir).adapter),
        **facts,
    )


def cached_summary(run_dir: Path) -> RunSummary:
    return summarize_run(run_dir, cached=True)


def _is_run_folder(path: Path) -> bool | str:
    """True for a run folder, False for anything else, or a note when it cannot be looked into."""
    if path.name.startswith("."):  # .uploads and other bookkeeping
        return False
    try:
        if not path.is_dir():
            return False
        paths = RunPaths(path)
        return paths.config.exists() or paths.status.exists() or paths.launch.exists()
    except OSError as error:
        return f"unreadable: {_reason(error)}"


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """All runs, newest first; folders that are not runs are skipped, damaged ones listed with a note."""
    runs_dir = Path(runs_dir)
    try:
        entries = sorted(runs_dir.iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        kind = _is_run_folder(path)
        if isinstance(kind, str):
            found.append(unreadable_summary(path, kind))
        elif kind:
            found.append(cached_summary(path))
    return sorted(found, key=lambda r: r.created_at or 0, reverse=True)


def log_tail(run_dir: Path, lines: int = 40) -> str:
    try:
        with open(RunPaths(Path(run_dir)).log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as error:
        return f"(train.log is unreadable: {_reason(error)})"
    return "\n".join(text.replace("\0", "").splitlines()[-lines:])


class RunWatcher:
    """Incremental reader of one run's metrics and GPU samples, for polling UIs; shared by every viewer.

    Each ``refresh`` reads only the bytes appended since the last one, so a timer tick
    costs a ``stat`` and a small read, not a re-parse of the whole log. Thread-safe: one
    refresh at a time (a lock), and the lists are replaced, never changed in place, so a
    viewer holding ``metrics`` from an earlier refresh still holds a consistent list.
    ``version`` grows with every change (a resume can shorten the metrics, so their length
    cannot tell a change).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.paths = RunPaths(self.run_dir)
        self.metrics: list[dict] = []
        self.gpu_samples: list[dict] = []
        self.metrics_version = 0
        self.samples_version = 0
        self._metrics_offset = 0
        self._gpu_offset = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> tuple[int, int]:
        return self.metrics_version, self.samples_version

    def snapshot(self) -> tuple[list[dict], list[dict], int, int]:
        """(metrics, samples, metrics version, samples version), read together: each list matches its version."""
        with self._lock:
            return self.metrics, self.gpu_samples, self.metrics_version, self.samples_version

    def refresh(self) -> bool:
        """Read what was appended; True when something new arrived."""
        with self._lock:
            new_metrics, self._metrics_offset, _, _ = _read_jsonl(self.paths.metrics, self._metrics_offset)
            new_samples, self._gpu_offset, _, _ = _read_jsonl(self.paths.gpu, self._gpu_offset)
            new_metrics = [m for m in map(clean_metric, new_metrics) if m is not None]
            new_samples = [s for s in map(clean_sample, new_samples) if s is not None]
            if new_metrics:
                if any(is_resume(m) for m in new_metrics):
                    self.metrics = current_records(self.metrics + new_metrics)
                else:
                    self.metrics = self.metrics + new_metrics
                self.metrics_version += 1
            if new_samples:
                self.gpu_samples = self.gpu_samples + new_samples
                self.samples_version += 1
            return bool(new_metrics or new_samples)
