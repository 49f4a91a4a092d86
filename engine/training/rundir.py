"""The run directory: the one source of truth for a training run.

Layout (every reader — UI, CLI, tests — goes through this module)::

    runs/<name>/
      config.yaml      the fully resolved RunConfig, written before anything starts
      status.json      state machine + timestamps + fallbacks + error summary (atomic writes)
      metrics.jsonl    one JSON object per log / eval event, appended by the worker
      gpu.jsonl        NVML (or process RAM) samples, appended by the dashboard's sampler
      train.log        the worker's stdout and stderr
      adapter/         the PEFT adapter + tokenizer, saved at the end or on stop
      checkpoints/     resumable Trainer checkpoints
      lineage.json     base model, dataset hashes, package versions, git commit
      stop_request     present when a stop was asked for (by the UI, the CLI, anyone)
      ratings.jsonl    blind A/B ratings from the Chat tab

Files are appended or replaced atomically, so a dashboard that restarts, a second
browser or the CLI all read the same story.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import RunError

STATES = ("queued", "loading", "training", "evaluating", "saving", "completed", "stopped", "failed", "interrupted")
TERMINAL_STATES = ("completed", "stopped", "failed", "interrupted")
ACTIVE_STATES = ("loading", "training", "evaluating", "saving")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    status = property(lambda self: self.root / "status.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    gpu = property(lambda self: self.root / "gpu.jsonl")
    log = property(lambda self: self.root / "train.log")
    adapter = property(lambda self: self.root / "adapter")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lineage = property(lambda self: self.root / "lineage.json")
    stop_request = property(lambda self: self.root / "stop_request")
    ratings = property(lambda self: self.root / "ratings.jsonl")


# ----------------------------------------------------------------------------- small file helpers
def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


# ----------------------------------------------------------------------------- status
def read_status(run_dir: Path) -> dict:
    return read_json(RunPaths(Path(run_dir)).status, default={}) or {}


def update_status(run_dir: Path, state: str | None = None, **fields) -> dict:
    """Merge ``fields`` into status.json; a new ``state`` is timestamped in ``history``."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    paths = RunPaths(Path(run_dir))
    status = read_status(run_dir)
    now = time.time()
    if state is not None and status.get("state") != state:
        status.setdefault("history", []).append({"state": state, "t": now})
        status["state"] = state
        if state in ACTIVE_STATES and "started_at" not in status:
            status["started_at"] = now
        if state in TERMINAL_STATES:
            status["ended_at"] = now
        elif "ended_at" in status:
            del status["ended_at"]  # a resumed run is no longer ended
    status.update(fields)
    status["updated_at"] = now
    write_json_atomic(paths.status, status)
    return status


def add_fallback(run_dir: Path, sentence: str) -> None:
    """Record a setting the worker could not honour, in words, once."""
    status = read_status(run_dir)
    fallbacks = status.get("fallbacks", [])
    if sentence not in fallbacks:
        update_status(run_dir, fallbacks=fallbacks + [sentence])


# ----------------------------------------------------------------------------- creating and finding runs
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


def safe_run_dir(runs_dir: Path, name: str) -> Path:
    """The folder of run ``name``, refusing anything that could leave ``runs_dir``."""
    if not NAME_PATTERN.match(name or "") or ".." in name:
        raise RunError(f"'{name}' is not a valid run name (letters, digits, '-', '_', '.'; no path separators).")
    return Path(runs_dir) / name


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
    update_status(run_dir, "queued", created_at=time.time(), message="Waiting to start.")
    return run_dir


def resolve_run(runs_dir: Path, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.yaml").exists():
        return path
    run_dir = safe_run_dir(runs_dir, name_or_path)
    if not (run_dir / "config.yaml").exists():
        raise RunError(f"No run named '{name_or_path}' in {runs_dir}.")
    return run_dir


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

    def as_row(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "base model": self.base_model,
            "status": self.state,
            "steps": f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step),
            "train loss": None if self.train_loss is None else round(self.train_loss, 4),
            "eval loss": None if self.eval_loss is None else round(self.eval_loss, 4),
            "task score": None if self.task_score is None else f"{self.task_metric} {self.task_score:.3f}",
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


def summarize_run(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    status = read_status(run_dir)
    try:
        import yaml

        config = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        config = {}
    metrics = read_metrics(run_dir)
    train_losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    eval_losses = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None and m.get("step", 0) > 0]
    task_evals = [m for m in metrics if m.get("event") == "task_eval" and m.get("score") is not None]
    peak, source = peak_memory(read_gpu_samples(run_dir))
    method = _method_of(config)
    started, ended = status.get("started_at"), status.get("ended_at") or (
        time.time() if status.get("state") in ACTIVE_STATES else None)
    return RunSummary(
        name=run_dir.name,
        path=run_dir,
        state=status.get("state", "unknown"),
        method=method,
        base_model=(config.get("model") or {}).get("name_or_path", "?"),
        step=int(status.get("step") or 0),
        max_steps=status.get("max_steps"),
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
        baseline_eval_loss=status.get("baseline_eval_loss"),
        peak_memory_bytes=peak,
        memory_source=source,
        duration_s=(ended - started) if started and ended else None,
        created_at=status.get("created_at"),
        message=status.get("message", ""),
        error=status.get("error"),
        fallbacks=status.get("fallbacks", []),
        has_adapter=(paths.adapter / "adapter_config.json").exists(),
        task_metric=task_evals[-1].get("metric") if task_evals else None,
        task_score=task_evals[-1]["score"] if task_evals else None,
    )


_summary_cache: dict[Path, tuple[tuple, RunSummary]] = {}


def _signature(run_dir: Path) -> tuple:
    paths = RunPaths(run_dir)
    signature = []
    for path in (paths.status, paths.metrics, paths.gpu, paths.config, paths.adapter / "adapter_config.json"):
        try:
            stat = path.stat()
            signature.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            signature.append(None)
    return tuple(signature)


def cached_summary(run_dir: Path) -> RunSummary:
    """``summarize_run``, re-read only when one of the run's files changed (the runs table polls)."""
    signature = _signature(run_dir)
    hit = _summary_cache.get(run_dir)
    if hit is None or hit[0] != signature:
        hit = (signature, summarize_run(run_dir))
        _summary_cache[run_dir] = hit
    return hit[1]


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """All runs, newest first; folders without a config are not runs and are skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [cached_summary(p) for p in runs_dir.iterdir() if p.is_dir() and (p / "config.yaml").exists()]
    return sorted(found, key=lambda r: r.created_at or 0, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = RunPaths(Path(run_dir)).checkpoints
    candidates = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(candidates, key=lambda p: int(p.name.split("-")[-1])) if candidates else None


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
