"""The bounds every request is held to, in one place: sizes, counts and times, each with its reason.

A dashboard is shared by whoever can reach it, and one careless request (a 50 MB JSON line,
a dataset path of ``/``, a 200,000-character prompt) must not take the machine for minutes.
Each handler that reads, walks, tokenizes or generates checks the bound here *before* the
expensive work and refuses in words that name the bound and how to change it.

Every bound can be changed without code: set ``LORALAB_<NAME>`` (upper case) in the
environment of the dashboard or command, e.g. ``LORALAB_MAX_ROW_BYTES=16777216``. Values are
read when ``limits()`` is first called in a process.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import lru_cache

from engine.errors import ConfigError

ENV_PREFIX = "LORALAB_"


def _bound(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Limits:
    # ---- datasets (engine.data.read)
    max_row_bytes: int = _bound(
        4 * 2**20, "Largest single line of a JSONL or CSV file. A longer line is a bad row: skipped with "
                   "'Skip bad rows', otherwise refused with its line number, before it is parsed or tokenized.")
    max_json_document_bytes: int = _bound(
        256 * 2**20, "Largest .json document (it must be parsed whole); JSON Lines has no such limit.")
    max_folder_entries: int = _bound(
        10_000, "Most files and folders looked at when a dataset path is a folder; a bigger tree is refused.")
    max_folder_files: int = _bound(
        1_000, "Most data files (.jsonl .json .csv .tsv .parquet) read from one dataset folder.")
    # ---- chat (engine.chat.models)
    max_prompt_chars: int = _bound(
        32_000, "Most characters in one chat conversation (system prompt, history and the new message), "
                "checked before tokenizing.")
    max_generation_s: float = _bound(
        120.0, "Longest time one side's answer may generate before it is cut off (transformers' max_time).")
    # ---- run folders (engine.training.rundir)
    disk_reserve_bytes: int = _bound(
        256 * 2**10, "Space each run folder keeps in reserve, so a run that fills the disk can still record "
                     "why it failed.")

    @classmethod
    def describe(cls) -> dict[str, str]:
        """``name`` -> help, for documentation and the refusal sentences."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def read_limits(environ=None) -> Limits:
    """The defaults, with every ``LORALAB_<NAME>`` found in ``environ`` applied (a bad value is refused in words)."""
    environ = os.environ if environ is None else environ
    values = {}
    for item in dataclasses.fields(Limits):
        raw = environ.get(env_name(item.name))
        if raw is None or not raw.strip():
            continue
        kind = type(item.default)
        try:
            value = kind(float(raw)) if kind is int else kind(raw)
        except ValueError:
            raise ConfigError(env_name(item.name), f"must be a number, got {raw!r}.") from None
        if not value > 0 or value != value or value == float("inf"):
            raise ConfigError(env_name(item.name), f"must be a finite number above 0, got {raw!r}.")
        values[item.name] = value
    return Limits(**values)


@lru_cache(maxsize=1)
def limits() -> Limits:
    """This process's limits (read once)."""
    return read_limits()


def size_text(count: int | float) -> str:
    """Bytes as a person reads them: '52,428,800 bytes (50.0 MiB)'."""
    count = int(count)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count:,} bytes ({count / scale:.1f} {unit})"
    return f"{count:,} bytes"
