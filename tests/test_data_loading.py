"""Loading each format from small files, bad input as sentences with file and line, splits."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from engine.data.load import DEMO_SOURCE, load_dataset_rows, parse_column_map, split_rows
from engine.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def messages_of(row):
    return [(m["role"], m["content"]) for m in row["messages"]]


# ----------------------------------------------------------------------------- formats
def test_messages_jsonl_keeps_system_turns_and_joins_content_parts():
    loaded = load_dataset_rows(str(DATA / "messages.jsonl"))
    assert loaded.format == "messages"
    assert loaded.num_rows == 3 and loaded.skipped == 0
    assert messages_of(loaded.rows[0]) == [
        ("system", "You are terse."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
    ]
    assert messages_of(loaded.rows[2])[0] == ("user", "Say hi in French.")
    # The OpenAI layout's per-turn "weight" is ignored, and the user is told so.
    assert any("weight" in w for w in loaded.warnings)
    assert loaded.numbers == [1, 2, 3] and loaded.unit == "line"


def test_sharegpt_json_array_maps_human_and_gpt_roles():
    loaded = load_dataset_rows(str(DATA / "sharegpt.json"))
    assert loaded.format == "sharegpt"
    assert messages_of(loaded.rows[0]) == [("system", "Be kind."), ("user", "Hello"), ("assistant", "Hi there!")]


def test_alpaca_csv_joins_instruction_and_input_and_keeps_multiline_cells():
    loaded = load_dataset_rows(str(DATA / "alpaca.csv"))
    assert loaded.format == "alpaca"
    assert messages_of(loaded.rows[0]) == [("user", "Translate to French.\n\ngood morning"), ("assistant", "bonjour")]
    assert loaded.rows[1]["messages"][0]["content"].endswith("The cat sat on the mat,\nthen it slept.")
    assert messages_of(loaded.rows[2]) == [("user", "Name a prime number."), ("assistant", "7")]
    # CSV rows are numbered by the physical line they end on (row 2 spans two lines).
    assert loaded.numbers == [2, 4, 5]


@pytest.mark.parametrize("name", ["prompt_completion.jsonl", "prompt_completion.parquet"])
def test_prompt_completion_becomes_a_user_assistant_pair(name):
    loaded = load_dataset_rows(str(DATA / name))
    assert loaded.format == "prompt_completion"
    assert messages_of(loaded.rows[0]) == [("user", "The sky is"), ("assistant", " blue.")]


def test_parquet_rows_are_numbered_as_rows():
    loaded = load_dataset_rows(str(DATA / "prompt_completion.parquet"))
    assert loaded.unit == "row" and loaded.num_rows == 3


def test_text_rows_stay_text():
    loaded = load_dataset_rows(str(DATA / "text.jsonl"))
    assert loaded.format == "text"
    assert loaded.rows[0] == {"text": "Once upon a time there was a small red ball."}


def test_conversational_prompt_completion_lists(tmp_path):
    path = tmp_path / "pc.jsonl"
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    path.write_text(json.dumps(row) + "\n")
    assert messages_of(load_dataset_rows(str(path)).rows[0]) == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_messages_stored_as_json_text_in_a_csv_cell(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps([{"role": "user", "content": "Hi, you"}, {"role": "assistant", "content": "Hello"}])
    path.write_text('messages\n"' + cell.replace('"', '""') + '"\n')
    assert messages_of(load_dataset_rows(str(path)).rows[0]) == [("user", "Hi, you"), ("assistant", "Hello")]


def test_jsonl_with_a_json_extension_is_read_line_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    loaded = load_dataset_rows(str(path))
    assert [r["text"] for r in loaded.rows] == ["a", "b"] and loaded.unit == "line"


def test_json_object_wrapping_a_list_of_rows(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert load_dataset_rows(str(path)).num_rows == 2


def test_forced_format_with_a_column_map():
    loaded = load_dataset_rows(
        str(DATA / "custom_columns.jsonl"), fmt="alpaca", column_map="instruction=question, output=answer"
    )
    assert loaded.format == "alpaca"
    assert messages_of(loaded.rows[1]) == [("user", "Capital of Italy?"), ("assistant", "Rome")]
    assert loaded.lineage()["column_map"] == {"instruction": "question", "output": "answer"}


def test_column_map_also_renames_keys_inside_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"dialog": [{"who": "user", "said": "Q"}, {"who": "assistant", "said": "A"}]}) + "\n")
    loaded = load_dataset_rows(str(path), column_map={"messages": "dialog", "role": "who", "content": "said"})
    assert loaded.format == "messages" and messages_of(loaded.rows[0]) == [("user", "Q"), ("assistant", "A")]


def test_column_map_text_must_name_pairs():
    assert parse_column_map("a=b, c = d") == {"a": "b", "c": "d"}
    with pytest.raises(ConfigError, match="expected_field=your_column"):
        parse_column_map("just_a_name")


def test_demo_source_and_its_eval_split():
    train = load_dataset_rows(DEMO_SOURCE)
    held_out = load_dataset_rows(DEMO_SOURCE, split="eval")
    assert train.path.endswith("demo_train.jsonl") and held_out.path.endswith("demo_eval.jsonl")
    assert train.format == "messages" and train.num_rows > held_out.num_rows > 0


def test_sha256_is_of_the_file_bytes_and_lineage_records_counts():
    import hashlib

    path = DATA / "messages.jsonl"
    loaded = load_dataset_rows(str(path))
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    lineage = loaded.lineage()
    assert lineage["sha256"] == loaded.sha256 and lineage["num_rows"] == 3 and lineage["skipped_rows"] == 0


def test_limit_stops_reading_early():
    loaded = load_dataset_rows(DEMO_SOURCE, limit=7)
    assert loaded.num_rows == 7 and not loaded.complete


def test_a_local_dataset_folder_is_read_by_the_same_readers_as_a_file(tmp_path, monkeypatch):
    """A folder is walked (bounded), only data extensions are read, splits follow the datasets library's
    file-naming rules, and nothing is copied into the datasets library's cache."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    folder = tmp_path / "dataset"
    (folder / "nested").mkdir(parents=True)
    (folder / "train.csv").write_bytes((DATA / "alpaca.csv").read_bytes())
    (folder / "nested" / "secret.txt").write_text("root:$6$planted-shadow-line:19000:0:99999:7:::\n")
    (folder / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    loaded = load_dataset_rows(str(folder))
    assert loaded.format == "alpaca" and loaded.num_rows == 3 and loaded.unit == "line"
    assert loaded.numbers == [2, 4, 5]  # the CSV's own line numbers (row 2 spans two lines)
    assert "planted-shadow-line" not in repr(loaded.rows) and "hidden" not in repr(loaded.rows)
    with pytest.raises(DataError, match="no 'validation' split; its files make train"):
        load_dataset_rows(str(folder), split="validation")
    (folder / "validation.jsonl").write_text('{"text": "held out"}\n')
    assert load_dataset_rows(str(folder), split="validation").rows == [{"text": "held out"}]
    assert len(load_dataset_rows(str(folder)).rows) == 3  # train.csv alone
    assert not cache.exists()  # no Arrow copy outside the project
    assert len(loaded.sha256) == 64


def test_a_folder_with_no_data_files_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text('{"text": "a .txt is not a data file, even in JSON"}\n')
    with pytest.raises(DataError, match="holds no data files"):
        load_dataset_rows(str(tmp_path))


# ----------------------------------------------------------------------------- bad input
def test_malformed_json_names_file_and_line():
    with pytest.raises(DataError) as caught:
        load_dataset_rows(str(DATA / "malformed.jsonl"))
    assert caught.value.line == 3 and caught.value.path.endswith("malformed.jsonl")
    assert "malformed.jsonl, line 3: Malformed JSON" in str(caught.value)


def test_skipping_bad_rows_keeps_the_good_ones_and_counts_the_skipped():
    loaded = load_dataset_rows(str(DATA / "malformed.jsonl"), skip_bad=True)
    assert loaded.num_rows == 3 and loaded.skipped == 1
    assert loaded.numbers == [1, 2, 4]
    assert loaded.lineage()["skipped_rows"] == 1
    assert "line 3" in loaded.warnings[0]


def test_missing_fields_names_format_expected_and_found():
    with pytest.raises(DataError) as caught:
        load_dataset_rows(str(DATA / "missing_fields.jsonl"))
    message = str(caught.value)
    assert caught.value.line == 2
    assert "alpaca format" in message and "instruction, output" in message
    assert "found instruction, response" in message and "missing: output" in message


def test_undetectable_fields_list_what_was_found_and_what_is_expected():
    with pytest.raises(DataError) as caught:
        load_dataset_rows(str(DATA / "unknown_fields.jsonl"))
    message = str(caught.value)
    assert "question, reply" in message and "prompt_completion: prompt, completion" in message


def test_forced_format_that_does_not_fit_says_so():
    with pytest.raises(DataError, match="does not fit the sharegpt format.*found messages"):
        load_dataset_rows(str(DATA / "messages.jsonl"), fmt="sharegpt")


@pytest.mark.parametrize(
    "name, expected, line",
    [
        ("empty.jsonl", "The file is empty.", None),
        ("blank_lines.jsonl", "no rows, only blank lines", None),
        ("latin1.csv", "not UTF-8", 2),
        ("ragged.csv", "has 2 fields but the header has 3", 3),
        ("utf16.jsonl", "UTF-16", None),
        ("no_assistant.jsonl", "no assistant turn", 2),
        ("bad_array.json", "Malformed JSON", 4),
    ],
)
def test_broken_files_give_one_sentence(name, expected, line):
    with pytest.raises(DataError) as caught:
        load_dataset_rows(str(DATA / name))
    assert expected in str(caught.value)
    assert caught.value.line == line
    assert "Traceback" not in str(caught.value)


def test_unsupported_role_is_named(tmp_path):
    path = tmp_path / "tool.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    with pytest.raises(DataError, match="role 'tool'"):
        load_dataset_rows(str(path))


def test_missing_path_and_offline_hub_id_fail_fast_with_a_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not an existing local path"):
        load_dataset_rows("/no/such/file.jsonl")
    started = time.monotonic()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        load_dataset_rows("nobody-here/no-such-dataset")
    assert time.monotonic() - started < 10  # no minute of hub retries


def test_unknown_format_name_is_a_config_error():
    with pytest.raises(ConfigError, match="not a dataset format"):
        load_dataset_rows(str(DATA / "text.jsonl"), fmt="chatml")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some prose\n")
    with pytest.raises(DataError, match="not supported"):
        load_dataset_rows(str(path))


def test_a_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset_rows(str(path))


# ----------------------------------------------------------------------------- split
def test_split_is_seeded_disjoint_and_complete():
    rows = [{"text": str(i)} for i in range(100)]
    train, held_out = split_rows(rows, 0.1, seed=3)
    assert len(held_out) == 10 and len(train) == 90
    assert sorted(r["text"] for r in train + held_out) == sorted(r["text"] for r in rows)
    assert split_rows(rows, 0.1, seed=3) == (train, held_out)
    assert split_rows(rows, 0.1, seed=4)[1] != held_out


def test_split_keeps_at_least_one_row_on_each_side():
    assert [len(part) for part in split_rows([1, 2, 3], 0.01, seed=0)] == [2, 1]
    assert split_rows([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    with pytest.raises(ConfigError, match="eval_fraction"):
        split_rows([1, 2], 1.0, seed=0)
    with pytest.raises(ConfigError, match="nothing to train on"):
        split_rows([1], 0.5, seed=0)


# ----------------------------------------------------------------------------- large files
def test_preview_of_a_large_jsonl_reads_only_what_it_shows(tmp_path):
    """The first rows of a ~60 MB file: memory is bounded by the rows kept, not by the file."""
    path = tmp_path / "large.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "q" * 400}, {"role": "assistant", "content": "a"}]})
    with open(path, "w") as handle:
        for _ in range(120_000):
            handle.write(line + "\n")
    assert path.stat().st_size > 50 * 2**20
    tracemalloc.start()
    loaded = load_dataset_rows(str(path), limit=100)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loaded.num_rows == 100 and not loaded.complete
    assert peak < 5 * 2**20, f"peak {peak} bytes"


# ----------------------------------------------------------------------------- bounds (engine.limits)
def test_a_line_above_the_row_limit_is_refused_with_its_line_or_skipped(tmp_path, monkeypatch):
    from engine import limits as limits_module
    from engine.data import read

    monkeypatch.setattr(read, "limits", lambda: limits_module.Limits(max_row_bytes=1000))
    path = tmp_path / "big-row.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "' + "x" * 5000 + '"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError) as caught:
        load_dataset_rows(str(path))
    assert caught.value.line == 2 and "above the 1,000 bytes limit for one row (LORALAB_MAX_ROW_BYTES)" in str(
        caught.value)
    loaded = load_dataset_rows(str(path), skip_bad=True)
    assert [row["text"] for row in loaded.rows] == ["fine", "also fine"] and loaded.skipped == 1
    csv_path = tmp_path / "big-row.csv"
    csv_path.write_text("text\nfine\n" + "y" * 5000 + "\nalso fine\n")
    loaded = load_dataset_rows(str(csv_path), skip_bad=True)
    assert [row["text"] for row in loaded.rows] == ["fine", "also fine"] and loaded.numbers == [2, 4]


def test_a_wide_csv_header_is_checked_in_linear_time(tmp_path):
    import time as clock

    columns = [f"c{i}" for i in range(100_000)]
    path = tmp_path / "wide.csv"
    path.write_text(",".join(columns + ["text"]) + "\n" + ",".join(["0"] * 100_000 + ["hello"]) + "\n")
    started = clock.perf_counter()
    loaded = load_dataset_rows(str(path))
    assert loaded.rows == [{"text": "hello"}] and clock.perf_counter() - started < 10
    path.write_text(",".join(columns + ["c7", "c9"]) + "\n" + ",".join(["0"] * 100_002) + "\n")
    with pytest.raises(DataError, match="repeats the column name.s. c7, c9"):
        load_dataset_rows(str(path))


def test_a_folder_walk_is_bounded(tmp_path, monkeypatch):
    from engine import limits as limits_module
    from engine.data import read

    monkeypatch.setattr(read, "limits", lambda: limits_module.Limits(max_folder_entries=50, max_folder_files=5))
    for index in range(60):
        (tmp_path / f"note-{index}.md").write_text("x")
    with pytest.raises(DataError, match="more than 50 files and folders .LORALAB_MAX_FOLDER_ENTRIES."):
        load_dataset_rows(str(tmp_path))
    files = tmp_path / "many"
    files.mkdir()
    for index in range(6):
        (files / f"part-{index}.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="more than 5 data files"):
        load_dataset_rows(str(files))
