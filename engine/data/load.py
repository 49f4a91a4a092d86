"""Load a dataset for training or preview: read lazily, detect the format, normalise rows.

The worker and the Dataset tab both call ``load_dataset_rows``, so what a person previews
is what the model trains on. The pieces live in small modules:
``read`` (files, folders, hub), ``formats`` (detection and normalisation),
``preview`` (chat template and loss mask, as TRL computes them),
``stats`` (token statistics and warnings), ``report`` (the Dataset tab's figures) and ``cli``
(``python -m engine data``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.formats import FORMAT_CHOICES, WEIGHT_NOTE, RowError, detect_format, normalise_record
from engine.data.read import RecordReader, file_sha256, hub_revision, open_file_records
from engine.errors import ConfigError, DataError, LoraLabError

DEMO_SOURCE = "demo"
MAX_PROBLEMS_KEPT = 5



def demo_path(split: str = "train") -> Path:
    from engine.demo import demo_dataset_path

    return demo_dataset_path("eval" if split in {"eval", "validation", "test"} else "train")


def parse_column_map(text: str | dict | None) -> dict[str, str] | None:
    """``"instruction=question, output=answer"`` -> ``{"instruction": "question", ...}``."""
    if not text:
        return None
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()} or None
    mapping = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        expected, sep, actual = part.partition("=")
        if not sep or not expected.strip() or not actual.strip():
            raise ConfigError(
                "column_map", f"'{part.strip()}' is not of the form expected_field=your_column (e.g. output=answer)."
            )
        mapping[expected.strip()] = actual.strip()
    return mapping or None


class DatasetStream:
    """Normalised rows of one source, produced lazily; yields ``(number, raw, row)``.

    ``number`` is the line (JSONL, CSV) or row of the source. Bad records raise
    ``DataError`` naming the file and line, or, with ``skip_bad``, are counted in
    ``skipped`` and the first few described in ``problems``.
    """

    def __init__(
        self,
        source: str,
        fmt: str = "auto",
        column_map: dict[str, str] | str | None = None,
        skip_bad: bool = False,
        split: str = "train",
    ):
        if fmt not in FORMAT_CHOICES:
            raise ConfigError("format", f"'{fmt}' is not a dataset format; choose {', '.join(FORMAT_CHOICES)}.")
        self.source = str(source).strip() if source else ""
        self.requested_format = fmt
        self.format: str | None = None if fmt == "auto" else fmt
        self.column_map = parse_column_map(column_map)
        self.skip_bad = skip_bad
        self.split = split
        self.skipped = 0
        self.problems: list[str] = []
        self.notes: set[str] = set()
        self._detected_at: int | None = None
        self.reader, self.path, self.is_hub = self._open()

    def _open(self) -> tuple[RecordReader, str, bool]:
        if self.source == DEMO_SOURCE:
            path = demo_path(self.split)
            if not path.is_file():
                raise DataError("The bundled demo dataset is missing from this checkout.", str(path))
            return open_file_records(path), str(path), False
        from engine.hub import looks_like_hub_id, resolve_source

        try:
            resolved = resolve_source(self.source, what="dataset", repo_type="dataset")
        except LoraLabError as exc:
            raise DataError(str(exc)) from None
        path = Path(resolved)
        if path.exists():
            return open_file_records(path, self.split), str(path), False
        if not looks_like_hub_id(resolved):  # pragma: no cover - resolve_source already refused it
            raise DataError(f"The dataset '{self.source}' is neither a file nor a hub id.")
        from engine.data.read import HubDatasetReader
        from engine.hub import hub_is_reachable

        return HubDatasetReader(resolved, self.split, streaming=hub_is_reachable()), resolved, True

    def progress(self) -> float:
        return self.reader.progress()

    def sha256(self) -> str:
        """sha256 of the file bytes; for a hub dataset ``id@revision``."""
        if self.is_hub:
            return f"{self.path}@{hub_revision(self.path)}"
        return file_sha256(Path(self.path))

    def _fail(self, number: int, message: str) -> None:
        path, prefix = self.reader.where(number)
        line = number if self.reader.unit == "line" else None
        if not self.skip_bad:
            raise DataError(prefix + message, path, line)
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(str(DataError(prefix + message, path, line)))

    def __iter__(self) -> Iterator[tuple[int, Any, dict]]:
        for record in self.reader:
            if record.error is not None:
                self._fail(record.number, record.error)
                continue
            try:
                if self.format is None:
                    self.format = detect_format(_mapped(record.value, self.column_map))
                    self._detected_at = record.number
                row = normalise_record(record.value, self.format, self.column_map, self.notes)
            except RowError as exc:
                message = str(exc)
                if self._detected_at is not None and self.requested_format == "auto" and "format" in message:
                    unit = self.reader.unit
                    message += (
                        f" The format was detected from {unit} {self._detected_at}; choose another format or map "
                        "the columns if that is wrong."
                    )
                self._fail(record.number, message)
                continue
            yield record.number, record.value, row

    def warnings(self) -> list[str]:
        found = []
        if self.skipped:
            found.append(
                f"Skipped {self.skipped} bad row(s); the first: " + " | ".join(self.problems[:MAX_PROBLEMS_KEPT])
            )
        if WEIGHT_NOTE in self.notes:
            found.append(WEIGHT_NOTE)
        return found


def _mapped(value: Any, column_map: dict[str, str] | None) -> Any:
    from engine.data.formats import apply_column_map

    return apply_column_map(value, column_map) if isinstance(value, dict) else value


def open_dataset(
    source: str,
    fmt: str = "auto",
    column_map: dict[str, str] | str | None = None,
    skip_bad: bool = False,
    split: str = "train",
) -> DatasetStream:
    """A lazy stream of normalised rows (the statistics pass reads whole datasets this way)."""
    return DatasetStream(source, fmt, column_map, skip_bad, split)


@dataclass
class LoadedDataset:
    """Rows ready for training, with what a run's lineage records about them."""

    rows: list[dict]
    format: str
    path: str
    source: str
    split: str
    skipped: int
    warnings: list[str]
    complete: bool  # False when ``limit`` stopped reading before the end
    numbers: list[int] = field(default_factory=list, repr=False)  # source line/row of each row
    unit: str = "line"
    raw: list[Any] | None = field(default=None, repr=False)
    column_map: dict[str, str] | None = None
    _stream: DatasetStream | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def sha256(self) -> str:
        """Computed on first use: a preview of a large file should not pay for hashing it."""
        if self._sha256 is None:
            self._sha256 = self._stream.sha256() if self._stream else ""
        return self._sha256

    def lineage(self) -> dict:
        return {
            "source": self.source,
            "path": self.path,
            "split": self.split,
            "format": self.format,
            "column_map": self.column_map,
            "sha256": self.sha256,
            "num_rows": self.num_rows,
            "skipped_rows": self.skipped,
            "complete": self.complete,
        }


def load_dataset_rows(
    source: str,
    fmt: str = "auto",
    column_map: dict[str, str] | str | None = None,
    skip_bad: bool = False,
    split: str = "train",
    limit: int | None = None,
    keep_raw: bool = False,
) -> LoadedDataset:
    """Read ``source`` (a path, a hub id, or ``"demo"``) into normalised rows.

    ``limit`` stops after that many good rows (a preview); ``keep_raw`` also keeps each
    raw record for display. Raises ``DataError`` (file and line) on bad input unless
    ``skip_bad``, and when no usable row is left.
    """
    stream = open_dataset(source, fmt, column_map, skip_bad, split)
    rows: list[dict] = []
    numbers: list[int] = []
    raw: list[Any] | None = [] if keep_raw else None
    complete = True
    for number, value, row in stream:
        rows.append(row)
        numbers.append(number)
        if raw is not None:
            raw.append(value)
        if limit is not None and len(rows) >= limit:
            complete = False
            break
    if not rows:
        if stream.skipped:
            raise DataError(
                f"No usable rows: all {stream.skipped} row(s) were bad. The first problem: {stream.problems[0]}"
            )
        raise DataError("The dataset has no rows.", stream.path)
    return LoadedDataset(
        rows=rows,
        format=stream.format or "messages",
        path=stream.path,
        source=stream.source,
        split=split,
        skipped=stream.skipped,
        warnings=stream.warnings(),
        complete=complete,
        numbers=numbers,
        unit=stream.reader.unit,
        raw=raw,
        column_map=stream.column_map,
        _stream=stream,
    )


def eval_indices(count: int, eval_fraction: float, seed: int) -> list[int]:
    """Positions ``split_rows`` holds out, in order (the statistics pass needs them without rows).

    At least one eval row when the fraction is above zero, at least one train row always.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError("eval_fraction", f"{eval_fraction} is outside the allowed range 0 <= fraction < 1.")
    n_eval = round(count * eval_fraction)
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    if count and n_eval >= count:
        raise ConfigError(
            "eval_fraction", f"{eval_fraction} of {count} row(s) leaves nothing to train on; lower the fraction."
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_eval])


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of ``eval_fraction`` of the rows; both parts keep their order."""
    held_out = set(eval_indices(len(rows), eval_fraction, seed))
    train = [row for i, row in enumerate(rows) if i not in held_out]
    evaluation = [rows[i] for i in sorted(held_out)]
    return train, evaluation
