"""The Chat tab through a real Gradio server and gradio_client: load, streaming, stop, blind rating."""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

PROMPT = "Extract as JSON: the small blue cup is under the bed."
# message, base history, fine-tuned history, system prompt, temperature, top-p, max new tokens,
# repetition penalty, seed, greedy
SEND_DEFAULTS = ("", 0.7, 0.95, 48, 1.0, 0, True)


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content or ""


@pytest.fixture(scope="module")
def app(demo_lora_run, tmp_path_factory):
    from engine.config import load_preset
    from engine.training.rundir import create_run
    from ui import chat_tab
    from ui.context import AppContext

    runs_dir = tmp_path_factory.mktemp("chat-ui-runs")
    run_dir = runs_dir / demo_lora_run.name
    shutil.copytree(demo_lora_run, run_dir,
                    ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state.pth"))
    create_run(runs_dir, load_preset("demo-lora"), name="not-started")
    ctx = AppContext(runs_dir=runs_dir, exports_dir=tmp_path_factory.mktemp("exports"))
    with gr.Blocks() as demo:
        with gr.Tab("Chat"):
            chat_tab.build(ctx)
    demo.queue()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = gradio_client.Client(demo.local_url, verbose=False)
        yield SimpleNamespace(client=client, ctx=ctx, run_dir=run_dir, models=ctx.chat)
    finally:
        demo.close()


def load(app) -> str:
    state, _ = app.client.predict(app.run_dir.name, "latest", "", api_name="/load")
    return state


def test_load_messages_name_the_problem_or_the_state(app):
    message, _ = app.client.predict("not-started", "latest", "", api_name="/load")
    assert "has no adapter yet" in message and "Traceback" not in message
    state = load(app)
    assert "Base model demo" in state and f"{app.run_dir.name} / adapter" in state and "CPU" in state


def test_one_send_streams_into_both_chatbots(app):
    load(app)
    job = app.client.submit(PROMPT, [], [], *SEND_DEFAULTS, api_name="/send")
    updates = list(job)
    base_texts = [text_of(base[-1]) for _, base, _, _ in updates if len(base) == 2 and text_of(base[-1])]
    tuned_texts = [text_of(tuned[-1]) for _, _, tuned, _ in updates if len(tuned) == 2 and text_of(tuned[-1])]
    # Several growing updates per side: streamed, not one final message.
    for texts in (base_texts, tuned_texts):
        assert len(set(texts)) >= 3
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    _, base, tuned, status = updates[-1]
    assert text_of(base[0]) == text_of(tuned[0]) == PROMPT
    assert text_of(base[1]) != text_of(tuned[1])
    assert status.startswith("Done.")

    # Multi-turn: each side continues its own history; Clear resets both.
    _, base2, tuned2, _ = app.client.predict("Repeat: the big red box.", base, tuned, *SEND_DEFAULTS, api_name="/send")
    assert len(base2) == len(tuned2) == 4 and text_of(base2[1]) == text_of(base[1])
    cleared_base, cleared_tuned, _ = app.client.predict(api_name="/clear")
    assert cleared_base == [] and cleared_tuned == []


def test_stop_ends_a_batch_within_a_second(app):
    load(app)
    # All 200 held-out prompts would take minutes; stop after the first answered row.
    job = app.client.submit("Run's held-out split", None, "", 0, True, *SEND_DEFAULTS, api_name="/batch")
    rows = 0
    deadline = time.monotonic() + 120
    while rows == 0 and time.monotonic() < deadline:
        outputs = job.outputs()
        if outputs:
            rows = len(outputs[-1][1]["data"])
        time.sleep(0.05)
    assert rows >= 1
    started = time.monotonic()
    app.client.predict(api_name="/stop")
    while (not job.done() or app.models.generating) and time.monotonic() - started < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"generation still running {elapsed:.2f} s after Stop"
    time.sleep(0.5)
    assert app.models.generating == 0  # and no further prompt was started
    final_rows = len(job.outputs()[-1][1]["data"])
    assert final_rows < 200


def batch_rows(job) -> int:
    outputs = job.outputs()
    return len(outputs[-1][1]["data"]) if outputs else 0


def test_stop_in_one_browser_session_leaves_another_generating(app):
    load(app)
    other = gradio_client.Client(app.client.src, verbose=False)  # a second browser session
    job = app.client.submit("Run's held-out split", None, "", 0, True, *SEND_DEFAULTS, api_name="/batch")
    deadline = time.monotonic() + 120
    while batch_rows(job) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch_rows(job) >= 1
    assert other.predict(api_name="/stop") == "Stopping…"
    rows_at_stop = batch_rows(job)
    while batch_rows(job) <= rows_at_stop and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch_rows(job) > rows_at_stop and not job.done()  # still answering after the other session's Stop

    app.client.predict(api_name="/stop")
    started = time.monotonic()
    while (not job.done() or app.models.generating) and time.monotonic() - started < 5:
        time.sleep(0.02)
    assert job.done() and app.models.generating == 0


def test_blind_ratings_are_recorded_in_the_run(app):
    from engine.chat.ratings import read_ratings, win_rate

    load(app)
    lines = "Extract as JSON: the big red apple is on the table.\nExtract as JSON: the tiny gray key is near the box."
    final = app.client.predict("Typed lines", None, lines, 0, True, *SEND_DEFAULTS, api_name="/batch")
    status, table = final[0], final[1]
    assert status.startswith("Done: 2 of 2")
    assert table["headers"] == ["prompt", "answer A", "answer B", "reference"]
    shown = {row[0]: (row[1], row[2]) for row in table["data"]}

    first = app.client.predict(api_name="/rate_a")
    second = app.client.predict(api_name="/rate_tie")
    extra = app.client.predict(api_name="/rate_b")  # nothing left to rate: records nothing
    records = read_ratings(app.run_dir)
    assert [r["choice"] for r in records] == ["A", "tie"]
    for record in records:
        assert (record["answer_a"], record["answer_b"]) == shown[record["prompt"]]
        tuned = record["answer_a"] if record["a_side"] == "finetuned" else record["answer_b"]
        assert record["winner"] in ("finetuned", "base", "tie") and tuned
        assert record["sampling"]["greedy"] is True and record["sampling"]["max_new_tokens"] == 48
    rate, wins, count = win_rate(app.run_dir)
    assert count == 2 and wins == (1 if records[0]["a_side"] == "finetuned" else 0)
    assert "of 2 blind ratings" in second[-1] and "of 2 blind ratings" in extra[-1]
    assert first[0].startswith("**Prompt 2 of 2** (1 rated)")  # outputs: prompt, answer A, answer B, win rate
