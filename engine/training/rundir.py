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
      checkpoints/     resumable Trainer checkpoints
      lineage.json     base model, dataset hashes, package versions, git commit
      stop_request     present when a stop was asked for (by the UI, the CLI, anyone)
      ratings.jsonl    blind A/B ratings from the Chat tab
      .lock            held around every read-modify-write of status.json or launch.json

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
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.errors import RunError
from engine.names import check_name

STATES = ("queued", "loading", "training", "evaluating", "saving", "completed", "stopped", "failed", "interrupted")
TERMINAL_STATES = ("completed", "stopped", "failed", "interrupted")
ACTIVE_STATES = ("loading", "training", "evaluating", "saving")
STOP_REQUESTED_MESSAGE = "Stop requested: finishing the current step."


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
    trackers = property(lambda self: self.root / "trackers.json")  # where tracker copies went (trackers.py)


# ----------------------------------------------------------------------------- small file helpers
def write_json_atomic(path: Path, data: dict) -> None:
    # The temporary name is per process and thread, so two writers never share one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def append_jsonl(path: Path, record: dict) -> None:
    """One line per write, flushed: a reader never sees half a record except the last line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()


def read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Records from byte ``offset`` on, and the offset to continue from.

    A trailing partial line (a writer mid-append) is left for the next call, so a
    polling UI reads each record exactly once and never re-reads the whole file.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    records = []
    consumed = 0
    for line in chunk.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, offset + consumed


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
    # launch facts (the launcher's)
    created_at: float | None = None
    worker_started_at: float | None = None
    queue_position: int | None = None
    # derived when read
    started_at: float | None = None
    ended_at: float | None = None
    updated_at: float | None = None
    stop_requested: bool = False
    extra: dict = field(default_factory=dict)  # keys a newer or older writer added; kept, not interpreted

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    def as_dict(self) -> dict:
        """The JSON shape ``read_status`` has always returned: unknown values are left out."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        return data


# Which file owns which fact. ``state``, ``message``, ``error`` and ``pid`` exist on both
# sides (each side's own account); the merge takes them from the side that set a state last.
SHARED_FIELDS = ("state", "message", "error", "pid")
WORKER_FIELDS = SHARED_FIELDS + ("step", "max_steps", "eta_s", "fallbacks", "baseline_eval_loss",
                                 "trainable_parameters", "total_parameters", "linear4bit_layers",
                                 "train_runtime_s", "tokens_seen")
LAUNCHER_FIELDS = SHARED_FIELDS + ("created_at", "worker_started_at", "queue_position")
_BOOKKEEPING = ("history", "seq", "state_seq", "updated_at", "started_at", "ended_at")


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
        updated_at=max(worker.get("updated_at") or 0, launcher.get("updated_at") or 0) or None,
        stop_requested=stop_requested,
        extra={k: v for side in (launcher, worker) for k, v in side.items()
               if k not in known and k not in _BOOKKEEPING},
    )
    active_times = [h["t"] for h in merged_history if h["state"] in ACTIVE_STATES]
    status.started_at = active_times[0] if active_times else worker.get("started_at")
    if state in TERMINAL_STATES:
        status.ended_at = merged_history[-1]["t"] if merged_history else worker.get("ended_at")
    if stop_requested and state in ("loading", "training", "evaluating"):
        status.message = STOP_REQUESTED_MESSAGE  # until the worker answers with "saving"
    return status


def _read_sides(paths: RunPaths) -> tuple[dict, dict]:
    return read_json(paths.status, default={}) or {}, read_json(paths.launch, default={}) or {}


def read_run_status(run_dir: Path) -> RunStatus:
    """The typed status of a run; never blocks on the lock (both files are replaced atomically)."""
    paths = RunPaths(Path(run_dir))
    worker, launcher = _read_sides(paths)
    return _merge(worker, launcher, paths.stop_request.exists())


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
    worker, launcher = _read_sides(paths)
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
    write_json_atomic(paths.status if side == "worker" else paths.launch, mine)


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
        if unless_ended and read_run_status(run_dir).ended:
            return False
        _write_side(run_dir, "launcher", state, values, LAUNCHER_FIELDS)
    return True


# ----------------------------------------------------------------------------- creating and finding runs
def safe_run_dir(runs_dir: Path, name: str) -> Path:
    """The folder of run ``name``, refusing anything that could leave ``runs_dir``."""
    return Path(runs_dir) / check_name(name, "run", RunError)


def create_run(runs_dir: Path, config, name: str | None = None) -> Path:
    """Make the run folder, write the resolved config and a ``queued`` status."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = name or config.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}"
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
    config.save(RunPaths(run_dir).config)
    update_launch(run_dir, "queued", created_at=time.time(), message="Waiting to start.")
    return run_dir


def resolve_run(runs_dir: Path, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.yaml").exists():
        return path
    run_dir = safe_run_dir(runs_dir, name_or_path)
    if not (run_dir / "config.yaml").exists():
        raise RunError(f"No run named '{name_or_path}' in {runs_dir}.")
    return run_dir


# ----------------------------------------------------------------------------- adapters and checkpoints
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def has_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a loadable PEFT adapter: its config and its weights."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and any((folder / name).is_file() for name in ADAPTER_WEIGHTS)


def checkpoints(run_dir: Path, adapters_only: bool = False) -> list[Path]:
    """The run's ``checkpoints/checkpoint-N`` folders, oldest step first."""
    found = [p for p in RunPaths(Path(run_dir)).checkpoints.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit() and (not adapters_only or has_adapter(p))]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from."""
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

    def as_row(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "base model": self.base_model,
            "status": self.state,
            "steps": f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step),
            "train loss": None if self.train_loss is None else round(self.train_loss, 4),
            "eval loss": None if self.eval_loss is None else round(self.eval_loss, 4),
            "peak memory (MiB)": None if self.peak_memory_bytes is None else round(self.peak_memory_bytes / 2**20),
            "duration (s)": None if self.duration_s is None else round(self.duration_s),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created_at)) if self.created_at else "",
        }


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(RunPaths(Path(run_dir)).metrics)[0]


def read_gpu_samples(run_dir: Path) -> list[dict]:
    return read_jsonl(RunPaths(Path(run_dir)).gpu)[0]


def load_config(run_dir: Path):
    from engine.config import RunConfig

    return RunConfig.from_yaml(RunPaths(Path(run_dir)).config)


def peak_memory(samples: list[dict]) -> tuple[int | None, str | None]:
    """Largest memory used by the training process (NVML per-process, else device used, else RSS)."""
    peak, source = None, None
    for sample in samples:
        value = sample.get("process_bytes")
        if value is None and sample.get("devices"):
            value = max((d.get("used_bytes") or 0) for d in sample["devices"])
        if value is not None and (peak is None or value > peak):
            peak, source = value, sample.get("source")
    return peak, source


def _method_of(config: dict) -> str:
    """RunConfig.method (its one owner) for a config read leniently; '?' when the config is damaged."""
    from engine.config import RunConfig
    from engine.errors import LoraLabError

    try:
        return RunConfig.from_dict(config).method
    except (LoraLabError, TypeError, ValueError, AttributeError):
        return "?"


def _file_facts(run_dir: Path) -> dict:
    """The costly part of a summary: parsed config, metrics and memory samples."""
    paths = RunPaths(run_dir)
    try:
        import yaml

        config = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        config = {}
    metrics = read_metrics(run_dir)
    train_losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    eval_losses = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None and m.get("step", 0) > 0]
    peak, source = peak_memory(read_gpu_samples(run_dir))
    method = _method_of(config)
    return {"method": method, "base_model": (config.get("model") or {}).get("name_or_path", "?"),
            "train_loss": train_losses[-1] if train_losses else None,
            "eval_loss": eval_losses[-1] if eval_losses else None,
            "peak_memory_bytes": peak, "memory_source": source}


_facts_cache: dict[Path, tuple[tuple, dict]] = {}


def _signature(run_dir: Path) -> tuple:
    signature = []
    for path in (RunPaths(run_dir).metrics, RunPaths(run_dir).gpu, RunPaths(run_dir).config):
        try:
            stat = path.stat()
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            signature.append(None)
    return tuple(signature)


def summarize_run(run_dir: Path, cached: bool = False) -> RunSummary:
    """One row of the runs table.

    The status is read fresh every time (it is small), so the table can never show an
    older state than the header beside it; with ``cached`` only the parsed metrics, memory
    samples and config are reused until one of those files changes (the runs table polls).
    """
    run_dir = Path(run_dir)
    if cached:
        signature = _signature(run_dir)
        hit = _facts_cache.get(run_dir)
        if hit is None or hit[0] != signature:
            hit = (signature, _file_facts(run_dir))
            _facts_cache[run_dir] = hit
        facts = hit[1]
    else:
        facts = _file_facts(run_dir)
    status = read_run_status(run_dir)
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


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """All runs, newest first; folders without a config are not runs and are skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [cached_summary(p) for p in runs_dir.iterdir() if p.is_dir() and (p / "config.yaml").exists()]
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
    return "\n".join(text.splitlines()[-lines:])


class RunWatcher:
    """Incremental reader of one run's metrics and GPU samples, for polling UIs.

    Each ``refresh`` reads only the bytes appended since the last one, so a timer tick
    costs a ``stat`` and a small read, not a re-parse of the whole log.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.paths = RunPaths(self.run_dir)
        self.metrics: list[dict] = []
        self.gpu_samples: list[dict] = []
        self._metrics_offset = 0
        self._gpu_offset = 0

    def refresh(self) -> bool:
        """Read what was appended; True when something new arrived."""
        new_metrics, self._metrics_offset = read_jsonl(self.paths.metrics, self._metrics_offset)
        new_samples, self._gpu_offset = read_jsonl(self.paths.gpu, self._gpu_offset)
        self.metrics.extend(new_metrics)
        self.gpu_samples.extend(new_samples)
        return bool(new_metrics or new_samples)
