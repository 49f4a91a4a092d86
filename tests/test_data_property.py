"""Property-based: arbitrary bytes and arbitrary JSON shapes either load or raise DataError."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data.formats import FORMATS
from engine.data.load import load_dataset_rows
from engine.data.preview import encode_row, training_template
from engine.data.stats import StatsAccumulator
from engine.errors import DataError
from tests.data import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".dat"]
FIELD_NAMES = [
    "messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output",
    "prompt", "completion", "text", "system", "history", "type", "tool_calls", "weight",
]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "User", ""]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
json_values = st.recursive(
    scalars | st.sampled_from(ROLES),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)
# Near-valid rows reach deeper paths (turn validation, roles, content parts) than random
# shapes do: each format's layout, with values sometimes of the wrong type.
texts = st.text(max_size=30) | st.sampled_from(["", " ", "\ud800 lone surrogate", "Ça va ?"])
loose = texts | json_values
content_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": loose}), max_size=2)
chat_turns = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES), "content": texts | content_parts | json_values},
        optional={"weight": st.integers(0, 1), "tool_calls": json_values},
    ),
    max_size=4,
)
sharegpt_turns = st.lists(st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": loose}), max_size=4)
near_valid_rows = st.one_of(
    st.fixed_dictionaries({"messages": chat_turns}),
    st.fixed_dictionaries({"conversations": sharegpt_turns}, optional={"system": loose}),
    st.fixed_dictionaries(
        {"instruction": loose, "output": loose},
        optional={"input": loose, "system": loose, "history": st.lists(st.lists(loose, max_size=3), max_size=2)},
    ),
    st.fixed_dictionaries({"prompt": loose | chat_turns, "completion": loose | chat_turns}, optional={"system": loose}),
    st.fixed_dictionaries({"text": loose}),
    st.dictionaries(keys, json_values, max_size=5),
)
rows_of_any_shape = st.lists(json_values | near_valid_rows, min_size=1, max_size=6)
formats = st.sampled_from(["auto", *FORMATS])
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tiny_tokenizer():
    return tiny_tokenizer.build_tiny_tokenizer()


TOKENIZER = None


def _exercise(path: Path, fmt: str, skip_bad: bool) -> None:
    """Load, count and encode: only DataError may escape."""
    global TOKENIZER
    try:
        loaded = load_dataset_rows(str(path), fmt=fmt, skip_bad=skip_bad)
    except DataError as exc:
        assert str(exc)
        return
    assert loaded.num_rows == len(loaded.rows) > 0
    assert loaded.format in FORMATS
    for row in loaded.rows:
        assert set(row) in ({"messages"}, {"text"})
        if "messages" in row:
            assert all(m["role"] in {"system", "user", "assistant"} and isinstance(m["content"], str)
                       for m in row["messages"])
    accumulator = StatsAccumulator()
    for row in loaded.rows:
        accumulator.add(row)
    assert accumulator.stats.rows == loaded.num_rows
    TOKENIZER = TOKENIZER or _tiny_tokenizer()
    template = training_template(TOKENIZER)
    for row in loaded.rows[:3]:
        try:
            encoded = encode_row(TOKENIZER, row, template, 64)
        except DataError:
            continue
        assert len(encoded.trained) == encoded.length


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES), fmt=formats, skip_bad=st.booleans())
def test_arbitrary_bytes_load_or_raise_data_error(data, suffix, fmt, skip_bad):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        _exercise(path, fmt, skip_bad)


@PROPERTY_SETTINGS
@given(rows=rows_of_any_shape, fmt=formats, skip_bad=st.booleans(), layout=st.sampled_from(["jsonl", "json", "csv"]))
def test_arbitrary_json_shapes_load_or_raise_data_error(rows, fmt, skip_bad, layout):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input.{layout}"
        if layout == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif layout == "json":
            path.write_text(json.dumps(rows))
        else:  # CSV: one column per top-level key, JSON-encoded cells
            header = sorted({k for r in rows if isinstance(r, dict) for k in r if k and "," not in k} or {"text"})
            lines = [",".join(header)]
            for r in rows:
                cells = [json.dumps(r.get(k)) if isinstance(r, dict) else json.dumps(r) for k in header]
                lines.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
            path.write_text("\n".join(lines) + "\n")
        _exercise(path, fmt, skip_bad)


@PROPERTY_SETTINGS
@given(rows=st.lists(near_valid_rows, min_size=1, max_size=5))
def test_rows_that_load_always_satisfy_the_trainer_contract(rows):
    """Whatever the loader accepts has an assistant turn, so TRL never meets an unmaskable row."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            loaded = load_dataset_rows(str(path), skip_bad=True)
        except DataError:
            return
        for row in loaded.rows:
            if "messages" in row:
                assert any(m["role"] == "assistant" for m in row["messages"])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_suffix_handles_the_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError):
        load_dataset_rows(str(path))
