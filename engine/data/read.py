"""Reading raw records from a file, a folder or a hub dataset, lazily.

Records are produced one at a time, so previewing the first rows of a 1 GB JSONL file
reads only those lines, and a statistics pass keeps nothing but what it counts. Each
reader reports progress as a fraction (bytes for JSONL and CSV, rows for the others).

A record that cannot be parsed (malformed JSON on one line, a ragged CSV row, a line that
is not UTF-8, a line longer than ``limits().max_row_bytes``) comes back as a ``Record`` with
``error`` set, so the caller decides to stop with the file and line or to skip it. Whole-file
problems (empty, not a Parquet file, a JSON array that does not parse, a JSON document above
its size limit) raise ``DataError`` at once.

Bounded by design (``engine.limits``): a line is read at most ``max_row_bytes + 1`` bytes at a
time, so one 50 MB line costs a skip, not 50 MB of parsing and tokenizing; the CSV header check
is linear; a folder is walked breadth-first up to ``max_folder_entries`` entries, and only the
data extensions a file path accepts are read from it (a ``.txt`` beside them is not), by our
own readers, so nothing is copied into a cache outside the project.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import DataError
from engine.limits import env_name, limits, size_text

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SUPPORTED_FILES = "JSONL (.jsonl), JSON (.json), CSV (.csv, .tsv) or Parquet (.parquet)"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"
HASH_CHUNK = 1 << 20


@dataclass
class Record:
    """One raw record: ``number`` is its line (JSONL, CSV) or its position (others), from 1."""

    number: int
    value: Any = None
    error: str | None = None


class RecordReader:
    """Base reader: iterate ``Record``s; ``unit`` names what ``Record.number`` counts."""

    unit = "row"

    def __init__(self, path: str):
        self.path = path
        self._progress = 0.0

    def __iter__(self) -> Iterator[Record]:
        raise NotImplementedError

    def progress(self) -> float:
        return self._progress

    def where(self, number: int) -> tuple[str | None, str]:
        """(path, prefix) for a DataError about record ``number``: files name lines, others rows."""
        return self.path, ("" if self.unit == "line" else f"{self.unit.capitalize()} {number}: ")


# ----------------------------------------------------------------------------- helpers
def _check_not_empty_or_utf16(path: Path, head: bytes) -> None:
    if not head:
        raise DataError("The file is empty.", str(path))
    if head.startswith(UTF16_BOMS):
        raise DataError("The file is UTF-16 encoded; save it as UTF-8 and load it again.", str(path))


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotUtf8(exc.start, raw[exc.start]) from None


class _NotUtf8(Exception):
    def __init__(self, column: int, byte: int):
        super().__init__(
            f"The text is not UTF-8 (byte 0x{byte:02x} at column {column + 1}); save the file as UTF-8."
        )


def _parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, a sentence saying why the JSON is malformed)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"Malformed JSON at column {exc.colno}: {exc.msg}."
    except RecursionError:
        return None, "The JSON is nested too deeply to read."
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return None, f"Malformed JSON: {exc}."


# ----------------------------------------------------------------------------- readers
def _row_too_long(size: int) -> str:
    cap = limits().max_row_bytes
    return (f"This line is {size_text(size)}, above the {size_text(cap)} limit for one row "
            f"({env_name('max_row_bytes')}); it was not read. Skip bad rows to leave it out.")


def bounded_lines(handle, cap: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, size) for each line of a binary file, reading at most ``cap + 1`` bytes of any line.

    A longer line comes back as ``(None, its size)`` after the rest of it was skipped in chunks,
    so memory stays bounded however long the line is.
    """
    while True:
        raw = handle.readline(cap + 1)
        if not raw:
            return
        if len(raw) <= cap or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        while True:
            chunk = handle.readline(HASH_CHUNK)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
        yield None, size


class JsonLinesReader(RecordReader):
    unit = "line"

    def __iter__(self) -> Iterator[Record]:
        path = Path(self.path)
        size = path.stat().st_size
        yielded = False
        with open(path, "rb") as handle:
            _check_not_empty_or_utf16(path, handle.read(4))
            handle.seek(0)
            for number, (raw, length) in enumerate(bounded_lines(handle, limits().max_row_bytes), start=1):
                self._progress = handle.tell() / size if size else 1.0
                if raw is None:
                    yielded = True
                    yield Record(number, error=_row_too_long(length))
                    continue
                if number == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
                if not raw.strip():
                    continue
                yielded = True
                try:
                    text = _decode_line(raw)
                except _NotUtf8 as exc:
                    yield Record(number, error=str(exc))
                    continue
                value, error = _parse_json(text)
                yield Record(number, value=value, error=error)
        self._progress = 1.0
        if not yielded:
            raise DataError("The file has no rows, only blank lines.", self.path)


class JsonDocumentReader(RecordReader):
    """A JSON array of rows, a single row object, or ``{"data": [rows]}``.

    A JSON document has to be parsed whole, so it is read into memory (JSONL is the format
    for large files). A ``.json`` file that is really JSON Lines is read as such.
    """

    unit = "item"

    def __init__(self, path: str):
        super().__init__(path)
        self._lines_reader: JsonLinesReader | None = None

    def progress(self) -> float:
        return self._lines_reader.progress() if self._lines_reader else self._progress

    def where(self, number: int) -> tuple[str | None, str]:
        if self._lines_reader:
            return self._lines_reader.where(number)
        return super().where(number)

    def __iter__(self) -> Iterator[Record]:
        path = Path(self.path)
        size, cap = path.stat().st_size, limits().max_json_document_bytes
        if _looks_like_json_lines(path):  # read lazily, line by line, whatever its size
            self._lines_reader = JsonLinesReader(self.path)
            self.unit = "line"
            yield from self._lines_reader
            return
        if size > cap:
            raise DataError(
                f"The JSON document is {size_text(size)}, above the {size_text(cap)} limit "
                f"({env_name('max_json_document_bytes')}): a JSON document must be parsed whole. Save it as JSON "
                "Lines (one row per line), which is read lazily.", self.path)
        data = path.read_bytes()
        _check_not_empty_or_utf16(path, data[:4])
        if data.startswith(UTF8_BOM):
            data = data[len(UTF8_BOM) :]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(
                f"The file is not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8.", self.path, line
            ) from None
        if not text.strip():
            raise DataError("The file has no content, only whitespace.", self.path)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # several JSON values one after another: JSON Lines
                self._lines_reader = JsonLinesReader(self.path)
                self.unit = "line"
                yield from self._lines_reader
                return
            raise DataError(
                f"Malformed JSON at column {exc.colno}: {exc.msg}. A JSON document must parse whole, so bad "
                "rows cannot be skipped; JSON Lines (one row per line) can.",
                self.path,
                exc.lineno,
            ) from None
        except (RecursionError, ValueError) as exc:
            message = "The JSON is nested too deeply to read." if isinstance(exc, RecursionError) else str(exc)
            raise DataError(message, self.path) from None
        items = _rows_of_document(document, self.path)
        for index, item in enumerate(items, start=1):
            self._progress = index / len(items)
            yield Record(index, value=item)
        self._progress = 1.0


def _looks_like_json_lines(path: Path) -> bool:
    """A .json file whose first line is one whole JSON object followed by more: JSON Lines in disguise."""
    with open(path, "rb") as handle:
        first, _ = next(bounded_lines(handle, limits().max_row_bytes), (None, 0))
        rest = handle.read(4096)
    if not first or not rest.strip():
        return False
    value, error = _parse_json(first.lstrip(UTF8_BOM).decode("utf-8", errors="replace"))
    return error is None and isinstance(value, dict)


def _rows_of_document(document: Any, path: str) -> list:
    if isinstance(document, list):
        if not document:
            raise DataError("The JSON array is empty: there are no rows.", path)
        return document
    if isinstance(document, dict):
        from engine.data.formats import FORMAT_FIELDS

        known = {field for required, optional in FORMAT_FIELDS.values() for field in required}
        if known & set(document):
            return [document]  # a single row
        lists = [v for v in document.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(document) == 1 and len(lists) == 1:
            return lists[0]  # {"data": [...]}, as some exports wrap rows
        return [document]  # let format detection say which fields it found
    raise DataError(f"The file holds a single JSON {type(document).__name__}, not a list of rows.", path)


class CsvReader(RecordReader):
    unit = "line"

    def __iter__(self) -> Iterator[Record]:
        path = Path(self.path)
        size = path.stat().st_size
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        cap = limits().max_row_bytes
        # The csv module refuses fields above 128 KiB by default; the per-row limit is the bound instead.
        csv.field_size_limit(max(csv.field_size_limit(), cap))
        too_long: list[tuple[int, int]] = []  # (line, size) of lines replaced by a blank one

        with open(path, "rb") as raw:
            _check_not_empty_or_utf16(path, raw.read(4))
            raw.seek(0)

            def lines() -> Iterator[str]:
                for number, (line, length) in enumerate(bounded_lines(raw, cap), start=1):
                    if line is None:
                        too_long.append((number, length))
                        yield "\n"  # the csv reader sees a blank line; the record below says why
                        continue
                    if number == 1 and line.startswith(UTF8_BOM):
                        line = line[len(UTF8_BOM) :]
                    try:
                        yield line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise DataError(
                            f"The file is not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                            "save it as UTF-8.", self.path, number) from None

            reader = csv.reader(lines(), delimiter=delimiter, strict=True)
            header: list[str] | None = None
            yielded = False
            try:
                for fields in reader:
                    self._progress = raw.tell() / size if size else 1.0
                    while too_long:
                        line, length = too_long.pop(0)
                        yielded = True
                        yield Record(line, error=_row_too_long(length))
                    if not fields or (len(fields) == 1 and not fields[0].strip()):
                        continue  # blank line
                    if header is None:
                        header = self._check_header(fields, reader.line_num)
                        continue
                    yielded = True
                    if len(fields) != len(header):
                        yield Record(
                            reader.line_num,
                            error=(
                                f"This CSV row has {len(fields)} fields but the header has {len(header)}; "
                                "a quote or delimiter is probably out of place."
                            ),
                        )
                        continue
                    yield Record(reader.line_num, value=dict(zip(header, fields)))
            except csv.Error as exc:
                raise DataError(f"The CSV cannot be parsed: {exc}.", self.path, reader.line_num + 1) from None
        self._progress = 1.0
        if header is None:
            raise DataError("The file has no rows, only blank lines.", self.path)
        if not yielded:
            raise DataError("The CSV has a header line but no rows under it.", self.path)

    def _check_header(self, fields: list[str], line: int) -> list[str]:
        header = [f.strip() for f in fields]
        if any(not name for name in header):
            raise DataError("The CSV header has an empty column name.", self.path, line)
        counts = Counter(header)  # linear: a 100,000-column header is checked in milliseconds
        repeated = sorted(name for name, count in counts.items() if count > 1)
        if repeated:
            shown = ", ".join(repeated[:10]) + (f" … ({len(repeated)} in all)" if len(repeated) > 10 else "")
            raise DataError(f"The CSV header repeats the column name(s) {shown}.", self.path, line)
        return header


class ParquetReader(RecordReader):
    unit = "row"
    BATCH_ROWS = 256

    def __iter__(self) -> Iterator[Record]:
        import pyarrow
        import pyarrow.parquet as pq

        path = Path(self.path)
        if path.stat().st_size == 0:
            raise DataError("The file is empty.", self.path)
        try:
            parquet = pq.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"The file is not a readable Parquet file ({exc}).", self.path) from None
        total = parquet.metadata.num_rows
        if total == 0:
            raise DataError("The Parquet file has no rows.", self.path)
        number = 0
        try:
            for batch in parquet.iter_batches(batch_size=self.BATCH_ROWS):
                for value in batch.to_pylist():
                    number += 1
                    self._progress = number / total
                    yield Record(number, value=value)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"The Parquet file is damaged after row {number} ({exc}).", self.path) from None
        self._progress = 1.0


class HubDatasetReader(RecordReader):
    """A dataset through the ``datasets`` library: a hub id, or a local dataset folder."""

    unit = "row"

    def __init__(self, name: str, split: str, streaming: bool):
        super().__init__(name)
        self.split = split
        self.streaming = streaming

    def __iter__(self) -> Iterator[Record]:
        import datasets

        try:
            dataset = datasets.load_dataset(self.path, split=self.split, streaming=self.streaming)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"The dataset could not be loaded with split '{self.split}': {first_line}", self.path
            ) from None
        total = None if self.streaming else len(dataset)
        if total == 0:
            raise DataError(f"The split '{self.split}' has no rows.", self.path)
        for number, value in enumerate(dataset, start=1):
            if total:
                self._progress = number / total
            yield Record(number, value=value)
        self._progress = 1.0


# ----------------------------------------------------------------------------- entry points
def file_kind(path: Path) -> str:
    """jsonl / json / csv / parquet, from the extension or, failing that, the first bytes."""
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind:
        return kind
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip(UTF8_BOM).lstrip()
    if stripped.startswith(b"{"):
        return "jsonl"
    if stripped.startswith(b"["):
        return "json"
    raise DataError(f"The file type '{path.suffix or 'none'}' is not supported; use {SUPPORTED_FILES}.", str(path))


def folder_data_files(folder: Path) -> list[Path]:
    """The data files under ``folder``: walked breadth-first, bounded, hidden entries and symlinked folders skipped.

    Only the extensions a file path is read by (``FILE_KINDS``) count; anything else in the
    folder (a .txt, a README, a key) is never opened.
    """
    bounds = limits()
    folder = Path(folder)
    found: list[Path] = []
    visited = 0
    pending = deque([folder])
    while pending:
        current = pending.popleft()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"The folder cannot be read ({exc.strerror or exc}).", str(current)) from None
        for entry in entries:
            visited += 1
            if visited > bounds.max_folder_entries:
                raise DataError(
                    f"The folder holds more than {bounds.max_folder_entries:,} files and folders "
                    f"({env_name('max_folder_entries')}); give a data file, or a folder of data files.", str(folder))
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file() and Path(entry.name).suffix.lower() in FILE_KINDS:
                    found.append(Path(entry.path))
            except OSError:
                continue
            if len(found) > bounds.max_folder_files:
                raise DataError(
                    f"The folder holds more than {bounds.max_folder_files:,} data files "
                    f"({env_name('max_folder_files')}); merge them, or point at a smaller folder.", str(folder))
    if not found:
        raise DataError(f"The folder holds no data files; only {SUPPORTED_FILES} files are read from a folder.",
                        str(folder))
    return sorted(found)


def split_files(folder: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Which files make which split, by the ``datasets`` library's own naming rules (train*, *-test.*,
    data/validation-00000-of-00001.*); everything is ``train`` when no file names a split."""
    relative = {f.relative_to(folder).as_posix(): f for f in files}
    try:
        from datasets.data_files import _get_data_files_patterns
        from fsspec.utils import glob_translate

        def resolve(pattern: str) -> list[str]:
            regex = re.compile(glob_translate(pattern))
            return [name for name in relative if regex.match(name)]

        patterns = _get_data_files_patterns(resolve)
    except (ImportError, FileNotFoundError, ValueError):  # a datasets without the helper: one split
        return {"train": files}
    splits = {}
    for split, split_patterns in patterns.items():
        matched = {name for pattern in split_patterns for name in resolve(pattern)}
        if matched:
            splits[str(split)] = [relative[name] for name in sorted(matched)]
    return splits or {"train": files}


class FolderReader(RecordReader):
    """A folder of data files, read file after file by the same readers as a single file."""

    def __init__(self, path: str, split: str = "train"):
        super().__init__(path)
        folder = Path(path)
        splits = split_files(folder, folder_data_files(folder))
        if split not in splits:
            raise DataError(f"The folder has no '{split}' split; its files make {', '.join(splits)} (named as the "
                            "datasets library names splits: train*, validation*, test*).", path)
        self.files = splits[split]
        self._current: RecordReader | None = None
        self._done = 0

    @property
    def unit(self) -> str:  # type: ignore[override]
        return self._current.unit if self._current else "line"

    def where(self, number: int) -> tuple[str | None, str]:
        return self._current.where(number) if self._current else super().where(number)

    def progress(self) -> float:
        inner = self._current.progress() if self._current else 0.0
        return (self._done + inner) / len(self.files)

    def __iter__(self) -> Iterator[Record]:
        for done, file in enumerate(self.files):
            self._done = done  # progress() reads it from another thread
            self._current = open_file_records(file)
            yield from self._current
        self._done = len(self.files)


def open_file_records(path: Path, split: str = "train") -> RecordReader:
    """A reader for a local file, or for a folder of data files (see ``FolderReader``)."""
    if path.is_dir():
        return FolderReader(str(path), split=split)
    kind = file_kind(path)
    readers = {"jsonl": JsonLinesReader, "json": JsonDocumentReader, "csv": CsvReader, "parquet": ParquetReader}
    return readers[kind](str(path))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of every data file under a folder (relative names included)."""
    digest = hashlib.sha256()
    files = folder_data_files(path) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def hub_revision(repo_id: str) -> str:
    """The commit a hub dataset resolves to: asked of the hub, else read from the local cache."""
    from engine.hub import hub_is_reachable

    if hub_is_reachable():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(repo_id, timeout=10).sha
            if sha:
                return sha
        except Exception:  # noqa: BLE001 - a revision is lineage detail; loading succeeded or will say why
            pass
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    return refs.read_text().strip() if refs.is_file() else "unknown"
