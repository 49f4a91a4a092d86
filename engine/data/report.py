"""One inspection of a dataset: the figures the Dataset tab and the command line both show.

``inspect_dataset`` streams the whole source once (and the eval file, if any), so it
works on files larger than memory; ``StatsJob`` runs it in a thread for the dashboard, and
``StatsJobs`` keeps the dashboard's passes (bounded) so the UI holds only an id.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.data.load import eval_indices, open_dataset
from engine.data.preview import load_tokenizer, training_template
from engine.data.stats import (
    StatsAccumulator,
    TokenStats,
    copy_stats,
    dataset_warnings,
    digest_at,
    length_histogram,
    steps_per_epoch,
)
from engine.errors import DataError, LoraLabError

DEFAULT_MAX_LENGTH = 1024


@dataclass
class InspectReport:
    source: str
    path: str
    format: str | None
    rows: int
    skipped: int
    stats: TokenStats
    model: str | None = None
    template_origin: str | None = None
    train_rows: int = 0
    eval_rows: int = 0
    eval_description: str = "none"
    eval_duplicates: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    steps_per_epoch: int = 0
    sha256: str = ""
    complete: bool = True
    warnings: list[str] = field(default_factory=list)

    def histogram(self) -> tuple[list[int], list[int]]:
        return length_histogram(self.stats.lengths)

    def to_dict(self) -> dict:
        edges, counts = self.histogram()
        return {
            "source": self.source,
            "path": self.path,
            "format": self.format,
            "rows": self.rows,
            "skipped_rows": self.skipped,
            "sha256": self.sha256,
            "model": self.model,
            "chat_template": self.template_origin,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "eval": self.eval_description,
            "eval_rows_also_in_train": self.eval_duplicates,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.grad_accum,
            "steps_per_epoch": self.steps_per_epoch,
            "complete": self.complete,
            "tokens": self.stats.figures(),
            "histogram": {"bin_start": edges, "count": counts},
            "warnings": self.warnings,
        }

    def to_text(self) -> str:
        s = self.stats
        lines = [
            f"Dataset:     {self.path}",
            f"Format:      {self.format}",
            f"Rows:        {self.rows} ({self.skipped} bad rows skipped)",
            f"sha256:      {self.sha256}",
            f"Split:       {self.train_rows} train / {self.eval_rows} eval ({self.eval_description})",
        ]
        if s.tokenized:
            lines += [
                f"Tokens:      model {self.model}, chat template from {self.template_origin}, "
                f"max_length {s.max_length}",
                f"  total {s.total_tokens}, mean {s.mean_tokens:.1f}, max {s.max_tokens}, "
                f"trained on {s.trained_tokens}",
                f"  rows truncated {s.truncated_rows} ({s.tokens_lost} tokens lost)",
                f"  rows with no trained token {s.no_trainable_rows}",
            ]
        else:
            lines.append("Tokens:      not counted (no usable tokenizer or chat template)")
        lines += [
            f"Empty rows:  {s.empty_rows}",
            f"Duplicates:  {s.duplicate_rows} exact duplicate rows, {self.eval_duplicates} eval rows also in train",
            f"Steps/epoch: {self.steps_per_epoch} (batch {self.batch_size} x accumulation {self.grad_accum})",
        ]
        if not self.complete:
            lines.append("Stopped early: the figures cover only the rows read so far.")
        if self.warnings:
            lines.append("Warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


ProgressHook = Callable[[float, TokenStats], None]


def inspect_dataset(
    source: str,
    fmt: str = "auto",
    column_map=None,
    skip_bad: bool = False,
    split: str = "train",
    model: str | None = "demo",
    max_length: int | None = DEFAULT_MAX_LENGTH,
    eval_fraction: float = 0.0,
    eval_source: str | None = None,
    seed: int = 42,
    batch_size: int = 1,
    grad_accum: int = 1,
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> InspectReport:
    """Read ``source`` once and count everything; raises ``DataError`` if no row is usable."""
    warnings: list[str] = []
    tokenizer, template = None, None
    if model:
        try:
            tokenizer = load_tokenizer(model, fresh=True)  # this pass may run beside the UI's
            template = training_template(tokenizer)
        except LoraLabError as exc:
            warnings.append(f"Token statistics are not available: {exc}")
    context = getattr(tokenizer, "model_max_length", None)
    if max_length and context and context < 10**9 and max_length > context:  # huge values mean "not set"
        warnings.append(
            f"max_length={max_length} is above the model's context length of {context} tokens; "
            f"rows longer than {context} tokens go past the positions it was trained on."
        )

    stream = open_dataset(source, fmt, column_map, skip_bad, split)
    accumulator = StatsAccumulator(tokenizer, max_length, template)
    train_share = 0.9 if eval_source else 1.0
    stopped = False
    for _, _, row in stream:
        if cancel is not None and cancel.is_set():
            stopped = True
            break
        accumulator.add(row)
        if on_progress is not None:
            on_progress(stream.progress() * train_share, accumulator.stats)
    stats = accumulator.stats
    if stats.rows == 0 and not stopped:
        first = f" The first problem: {stream.problems[0]}" if stream.problems else ""
        raise DataError(f"No usable rows ({stream.skipped} bad rows).{first}", stream.path)

    report = InspectReport(
        source=stream.source,
        path=stream.path,
        format=stream.format,
        rows=stats.rows,
        skipped=stream.skipped,
        stats=stats,
        model=model if tokenizer is not None else None,
        template_origin=template.origin if template else None,
        batch_size=batch_size,
        grad_accum=grad_accum,
        complete=not stopped,
    )
    warnings = stream.warnings() + warnings

    if eval_source:
        eval_stream = open_dataset(eval_source, fmt, column_map, skip_bad, "eval" if eval_source == "demo" else split)
        train_digests = {digest_at(accumulator.digests, i) for i in range(stats.rows)}
        eval_accumulator = StatsAccumulator()
        for _, _, row in eval_stream:
            if cancel is not None and cancel.is_set():
                report.complete = False
                break
            eval_accumulator.add(row)
            if on_progress is not None:
                on_progress(0.9 + 0.1 * eval_stream.progress(), stats)
        report.eval_rows = eval_accumulator.stats.rows
        report.train_rows = stats.rows
        report.eval_description = f"second file {eval_stream.path}"
        report.eval_duplicates = sum(
            digest_at(eval_accumulator.digests, i) in train_digests for i in range(report.eval_rows)
        )
        warnings += eval_stream.warnings()
    elif eval_fraction > 0:
        held_out = eval_indices(stats.rows, eval_fraction, seed)
        held_set = set(held_out)
        train_digests = {digest_at(accumulator.digests, i) for i in range(stats.rows) if i not in held_set}
        report.eval_rows = len(held_out)
        report.train_rows = stats.rows - len(held_out)
        report.eval_description = f"fraction {eval_fraction} of the rows, seed {seed}"
        report.eval_duplicates = sum(digest_at(accumulator.digests, i) in train_digests for i in held_out)
    else:
        report.train_rows = stats.rows

    # Rows the trainer drops (nothing left to train on after truncation), in proportion.
    dropped = round(stats.no_trainable_rows * report.train_rows / stats.rows) if stats.rows else 0
    report.steps_per_epoch = steps_per_epoch(report.train_rows - dropped, batch_size, grad_accum)
    report.warnings = warnings + dataset_warnings(
        stats, template, report.train_rows, report.eval_duplicates, stream.format
    )
    if report.complete:
        report.sha256 = stream.sha256()
    return report


class StatsJob:
    """``inspect_dataset`` in a thread, with progress and partial figures a UI can poll.

    A pass nobody has polled for ``abandoned_after_s`` stops by itself: the page polls every
    second, so silence means the client left, and its work should not go on without it.
    """

    def __init__(self, abandoned_after_s: float = 30.0, **kwargs):
        self.kwargs = kwargs
        self.abandoned_after_s = abandoned_after_s
        self.last_seen = time.monotonic()
        self.state = "pending"
        self.progress = 0.0
        self.error: str | None = None
        self.report: InspectReport | None = None
        self.partial: TokenStats | None = None
        self.started = self.finished = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # guards partial/progress between the thread and snapshot()
        self._thread = threading.Thread(target=self._run, name="dataset-stats", daemon=True)

    def start(self) -> StatsJob:
        self.started = time.time()
        self.state = "running"
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            report = inspect_dataset(**self.kwargs, on_progress=self._locked_progress, cancel=self._cancel)
            with self._lock:
                self.report = report
                self.state = "done" if report.complete else "cancelled"
                self.progress = 1.0 if report.complete else self.progress
        except LoraLabError as exc:
            self.error, self.state = str(exc), "error"
        except Exception as exc:  # noqa: BLE001 - a bug, but the dashboard must live: report it as a sentence
            self.error, self.state = f"Statistics failed unexpectedly ({type(exc).__name__}: {exc}).", "error"
        finally:
            self.finished = time.time()

    def _locked_progress(self, fraction: float, stats: TokenStats) -> None:
        # Called after each row from the worker thread, so no copying here. The partial
        # figures a poll copies may be one row apart from each other; they are a progress
        # display, and the final report comes from the finished pass.
        with self._lock:
            self.progress = fraction
            self.partial = stats
        if time.monotonic() - self.last_seen > self.abandoned_after_s:
            self._cancel.set()  # the client left: stop after this row

    def snapshot(self) -> dict:
        self.last_seen = time.monotonic()
        with self._lock:
            return {
                "state": self.state,
                "progress": self.progress,
                "error": self.error,
                "report": self.report,
                "partial": copy_stats(self.partial) if self.partial is not None and self.report is None else None,
                "elapsed": (self.finished or time.time()) - (self.started or time.time()),
            }


class StatsJobs:
    """The dashboard's statistics passes by id: start, look up, cancel.

    Each browser session keeps only the id of its pass. At most ``keep`` passes are kept;
    starting one more cancels and forgets the oldest, so tabs abandoned mid-pass cannot pile
    up threads or figures in a dashboard left open for days.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._jobs: OrderedDict[str, StatsJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, **kwargs) -> str:
        """Start ``inspect_dataset(**kwargs)`` in a thread; returns the id to poll it by."""
        job, job_id = StatsJob(**kwargs), uuid.uuid4().hex
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)[1].cancel()
        job.start()
        return job_id

    def get(self, job_id: str | None) -> StatsJob | None:
        with self._lock:
            job = self._jobs.get(job_id) if job_id else None
        if job is not None:
            job.last_seen = time.monotonic()  # a poll: its client is still there
        return job

    def cancel(self, job_id: str | None) -> bool:
        """Ask the pass to stop after its current row; False if there is no such pass (any more)."""
        job = self.get(job_id)
        if job is not None:
            job.cancel()
        return job is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
