"""``python -m engine data inspect``: the same figures as the tab, errors with file and line."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.data.cli import main as cli_main
from engine.data.load import load_dataset_rows
from tests.data import tiny_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return tiny_tokenizer.save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = cli_main(["inspect", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_inspect_reports_format_counts_tokens_and_sha(capsys, tokenizer_folder):
    path = DATA / "messages.jsonl"
    code, report = run_json(capsys, str(path), "--model", str(tokenizer_folder), "--max-length", "24")
    assert code == 0
    assert report["format"] == "messages" and report["rows"] == 3
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in load_dataset_rows(str(path)).rows
    ]
    tokens = report["tokens"]
    assert tokens["total_tokens"] == sum(lengths) and tokens["max_tokens"] == max(lengths)
    assert tokens["truncated_rows"] == sum(n > 24 for n in lengths)
    assert sum(report["histogram"]["count"]) == 3
    assert any("500-1000" in w for w in report["warnings"])  # three rows is far too few
    assert any("weight" in w for w in report["warnings"])


def test_inspect_eval_split_and_steps(capsys, tokenizer_folder):
    code, report = run_json(
        capsys, "demo", "--model", str(tokenizer_folder), "--eval-fraction", "0.1",
        "--batch-size", "4", "--grad-accum", "2", "--max-length", "256",
    )
    assert code == 0
    rows = load_dataset_rows("demo").num_rows
    assert report["eval_rows"] == round(rows * 0.1) and report["train_rows"] == rows - report["eval_rows"]
    assert report["steps_per_epoch"] == math.ceil(math.ceil(report["train_rows"] / 4) / 2)


def test_inspect_finds_eval_rows_duplicated_in_train(capsys, tmp_path):
    train = tmp_path / "train.jsonl"
    held_out = tmp_path / "eval.jsonl"
    lines = (DATA / "text.jsonl").read_text().splitlines()
    train.write_text("\n".join(lines) + "\n")
    held_out.write_text(lines[0] + "\n" + json.dumps({"text": "new"}) + "\n")
    code, report = run_json(capsys, str(train), "--model", "", "--eval-file", str(held_out))
    assert code == 0 and report["eval_rows"] == 2 and report["eval_rows_also_in_train"] == 1
    assert any("also appear in the training data" in w for w in report["warnings"])


def test_inspect_text_output(capsys, tokenizer_folder):
    assert cli_main(["inspect", str(DATA / "alpaca.csv"), "--model", str(tokenizer_folder)]) == 0
    out = capsys.readouterr().out
    assert "Format:      alpaca" in out and "Rows:        3" in out and "Steps/epoch" in out


def test_inspect_error_names_file_and_line(capsys):
    assert cli_main(["inspect", str(DATA / "malformed.jsonl"), "--model", ""]) == 1
    err = capsys.readouterr().err
    assert "malformed.jsonl, line 3: Malformed JSON" in err and "Traceback" not in err

    code, report = run_json(capsys, str(DATA / "malformed.jsonl"), "--model", "")
    assert code == 1 and report["line"] == 3


def test_inspect_skip_bad_counts_the_skipped(capsys):
    code, report = run_json(capsys, str(DATA / "malformed.jsonl"), "--model", "", "--skip-bad")
    assert code == 0 and report["rows"] == 3 and report["skipped_rows"] == 1


def test_inspect_with_an_unreachable_model_still_counts_rows(capsys):
    code, report = run_json(capsys, str(DATA / "text.jsonl"), "--model", "nobody/no-such-model")
    assert code == 0 and report["rows"] == 2 and report["tokens"]["tokenized"] is False
    assert any("Token statistics are not available" in w for w in report["warnings"])


def test_forced_format_and_columns(capsys):
    code, report = run_json(
        capsys, str(DATA / "custom_columns.jsonl"), "--model", "", "--format", "alpaca",
        "--columns", "instruction=question,output=answer",
    )
    assert code == 0 and report["format"] == "alpaca" and report["rows"] == 2


def test_python_dash_m_engine_data_inspect(tmp_path):
    """The real command line, through engine/__main__.py."""
    import subprocess
    import sys

    project = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "data", "inspect", str(DATA / "ragged.csv"), "--model", ""],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "ragged.csv, line 3:" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "engine", "data", "inspect", str(DATA / "text.jsonl"), "--model", "", "--json"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["format"] == "text"
