"""The Dataset tab end to end through gradio_client: preview, mask, statistics, bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.data import tiny_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return str(tiny_tokenizer.save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import gradio as gr
    from gradio_client import Client

    from ui import data_tab
    from ui.context import AppContext

    folder = tmp_path_factory.mktemp("app")
    ctx = AppContext(runs_dir=folder / "runs", exports_dir=folder / "exports", max_upload_mb=0.01)
    with gr.Blocks() as demo:
        with gr.Tab("Dataset"):
            data_tab.build(ctx)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def load(client, source, model, max_length=64, upload=None, fmt="auto", columns="", skip_bad=False):
    return client.predict(
        source, upload, "train", fmt, columns, skip_bad, model, max_length, api_name="/load_preview"
    )


def run_stats(client, source, model, max_length=64, eval_fraction=0.0, eval_file="", upload=None):
    started, progress = client.predict(
        source, upload, "train", "auto", "", False, model, max_length, eval_fraction, eval_file, 2, 1, 42,
        api_name="/start_stats",
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text, plot, figures, warnings, timer = client.predict(api_name="/poll_stats")
        if not timer.get("active", True):
            return text, plot, figures, warnings
        time.sleep(0.2)
    raise AssertionError("statistics did not finish")


def test_preview_shows_raw_rows_and_the_rendered_mask(client, tokenizer_folder):
    status, page, table, rendered, info, row = load(client, str(DATA / "sharegpt.json"), tokenizer_folder)
    assert "sharegpt (detected)" in status and "all 2 rows" in status
    assert [r[0] for r in table["data"]] == [1, 2]
    assert '"conversations"' in table["data"][0][2]
    labels = {segment["class_or_confidence"] for segment in rendered}
    assert labels == {None, "trained"}
    trained = "".join(s["token"] for s in rendered if s["class_or_confidence"] == "trained")
    assert trained == "Hi there!<|im_end|>"
    assert "tokens" in info and "trained on" in info


def test_row_and_page_navigation(client, tokenizer_folder):
    load(client, "demo", tokenizer_folder, max_length=20)
    page, table = client.predict(3, api_name="/show_page")
    assert page == 3 and [r[0] for r in table["data"]] == list(range(21, 31))
    rendered, info = client.predict(25, api_name="/show_row")
    assert rendered[-1]["class_or_confidence"] == "cut off by max_length"
    assert "Cut off at token 20" in info


def test_statistics_histogram_matches_a_direct_count(client, tokenizer_folder):
    from transformers import AutoTokenizer

    from engine.data.load import load_dataset_rows

    source = str(DATA / "messages.jsonl")
    text, plot, figures, warnings = run_stats(client, source, tokenizer_folder, max_length=40)
    assert text.startswith("Statistics done: 3 rows")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in load_dataset_rows(source).rows
    ]
    figure = json.loads(plot["plot"])
    bars = figure["data"][0]
    for (low, high), count in zip(bars["customdata"], bars["y"]):
        assert count == sum(low <= n <= high for n in lengths)
    assert sum(bars["y"]) == len(lengths)
    assert any(shape.get("x0") == 40 for shape in figure["layout"]["shapes"])  # the max_length line

    values = dict(figures["data"])
    assert values["rows"] == "3"
    assert values["total tokens"] == str(sum(lengths))
    assert values["rows truncated at max_length=40"] == str(sum(n > 40 for n in lengths))
    assert values["tokens lost to truncation"] == str(sum(max(0, n - 40) for n in lengths))
    assert "500-1000" in warnings


def test_statistics_with_an_eval_fraction_report_the_split(client, tokenizer_folder):
    text, plot, figures, warnings = run_stats(client, "demo", tokenizer_folder, eval_fraction=0.25)
    values = dict(figures["data"])
    total = int(values["rows"])
    assert int(values["train rows"]) == total - round(total * 0.25)
    assert values["eval rows"].startswith(str(round(total * 0.25)))


def test_bad_rows_name_the_line_and_can_be_skipped(client, tokenizer_folder):
    status, *_ = load(client, str(DATA / "malformed.jsonl"), tokenizer_folder)
    assert status.startswith("**Error:**") and "line 3" in status and "Traceback" not in status
    status, page, table, *_ = load(client, str(DATA / "malformed.jsonl"), tokenizer_folder, skip_bad=True)
    assert "bad rows skipped:** 1" in status and len(table["data"]) == 3


@pytest.mark.parametrize(
    "name, expected",
    [("empty.jsonl", "empty"), ("latin1.csv", "not UTF-8"), ("ragged.csv", "header has 3"),
     ("missing_fields.jsonl", "missing: output")],
)
def test_broken_files_give_a_sentence(client, tokenizer_folder, name, expected):
    status, *_ = load(client, str(DATA / name), tokenizer_folder)
    assert status.startswith("**Error:**") and expected in status


def test_offline_hub_id_and_unknown_model_do_not_break_the_tab(client, tokenizer_folder):
    started = time.monotonic()
    status, *_ = load(client, "someone/some-dataset", tokenizer_folder)
    assert "HF_HUB_OFFLINE" in status and time.monotonic() - started < 20
    status, page, table, rendered, info, row = load(client, str(DATA / "text.jsonl"), "/no/such/model")
    assert "text (detected)" in status and rendered == [] and "not an existing local path" in info
    text, *_ = run_stats(client, "someone/some-dataset", tokenizer_folder)
    assert text.startswith("**Error:**")


def test_upload_is_used_and_capped(client, tokenizer_folder, tmp_path):
    from gradio_client import handle_file

    status, *_ = load(client, "demo", tokenizer_folder, upload=handle_file(str(DATA / "alpaca.csv")))
    assert "alpaca (detected)" in status
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * 20_000}) + "\n")  # above the 0.01 MB cap of this app
    status, *_ = load(client, "demo", tokenizer_folder, upload=handle_file(str(big)))
    assert status.startswith("**Error:**") and "limit" in status


def test_statistics_handlers_are_plain_functions_of_the_app_context(tmp_path, tokenizer_folder):
    """Called directly, no server: a session's new pass replaces its old one, and jobs live in the context."""
    from ui import data_tab
    from ui.context import AppContext

    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": str(i)}) + "\n" for i in range(100_000)))
    ctx = AppContext(runs_dir=tmp_path / "runs", exports_dir=tmp_path / "exports")
    settings = ("train", "auto", "", False, tokenizer_folder, 64, 0.0, "", 2, 1, 42)

    first, text, timer = data_tab.start_stats(ctx, None, str(big), None, *settings)
    assert first and text == "Statistics: starting…" and timer.active is True
    second, *_ = data_tab.start_stats(ctx, first, str(DATA / "messages.jsonl"), None, *settings)
    old = ctx.stats_jobs.get(first)
    old.wait(30)
    assert old.snapshot()["state"] == "cancelled"

    deadline = time.monotonic() + 60
    while (result := data_tab.poll_stats(ctx, second))[-1].active and time.monotonic() < deadline:
        time.sleep(0.05)
    text, figure, figures, warnings, timer = result
    assert text.startswith("Statistics done: 3 rows") and dict(figures)["rows"] == "3" and timer.active is False

    other = AppContext(runs_dir=tmp_path / "runs", exports_dir=tmp_path / "exports")
    assert data_tab.poll_stats(other, second)[0] == "No statistics running."  # no state shared through the module
    assert data_tab.stop_stats(ctx, second) == "Stopping…"
    assert data_tab.stop_stats(ctx, None) == "No statistics running."

    capped = AppContext(runs_dir=tmp_path / "runs", exports_dir=tmp_path / "exports", max_upload_mb=0.01)
    job_id, text, timer = data_tab.start_stats(capped, None, "demo", str(big), *settings)
    assert job_id is None and text.startswith("**Error:**") and "limit" in text and timer.active is False
    assert len(capped.stats_jobs) == 0
