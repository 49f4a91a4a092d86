"""The blind-rating state machine, per-session stop signals and the Chat tab's handlers, called directly.

No model is loaded here: a ``BlindSession`` is filled with answered rows the way the batch
comparison fills it, and the handlers are the module-level functions the tab wires.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from engine.chat.models import Sampling, StopSignals
from engine.chat.ratings import (
    BASE,
    FINETUNED,
    BlindSession,
    blind,
    format_win_rate_cell,
    read_ratings,
    win_rate,
    win_rate_record,
)
from engine.errors import ConfigError, RunError

ROWS = [{"prompt": f"prompt {i}", "base": f"base answer {i}", "finetuned": f"tuned answer {i}",
         "reference": f"reference {i}" if i % 2 else None, "base_f1": None, "finetuned_f1": None} for i in range(4)]


def session_with_rows(run_dir, rows=ROWS, seed=3) -> BlindSession:
    session = BlindSession(ratings_dir=str(run_dir), adapter=str(run_dir / "adapter"), base_model="demo",
                           label="run / adapter", sampling=Sampling(greedy=True).as_dict())
    rng = random.Random(seed)
    for row in rows:
        session.add(row, rng)
    return session


def tuned_letter(item) -> str:
    return "A" if item.a_side == FINETUNED else "B"


def test_blind_puts_each_side_under_the_letter_it_records():
    for side, other in ((FINETUNED, BASE), (BASE, FINETUNED)):
        item = blind(ROWS[0], side)
        assert item.a_side == side and item.b_side == other
        assert (item.answer_a, item.answer_b) == ((ROWS[0]["finetuned"], ROWS[0]["base"]) if side == FINETUNED
                                                  else (ROWS[0]["base"], ROWS[0]["finetuned"]))
    with pytest.raises(RunError, match="not a side"):
        blind(ROWS[0], "left")


def test_session_rates_in_order_then_says_all_are_rated(tmp_path):
    session = session_with_rows(tmp_path)
    assert {row["a_side"] for row in session.rows} == {BASE, FINETUNED}  # the coin really flips
    view = session.view(blind_mode=True)
    assert view.visible and view.position == 1 and view.total == 4 and view.rated == 0
    assert view.item == session.item(0) and view.win_rate == "No blind ratings yet."

    # Prefer the fine-tuned answer twice, the base once, then a tie: each by the letter it was shown under.
    choices = [tuned_letter(session.item(0)), tuned_letter(session.item(1)),
               "B" if tuned_letter(session.item(2)) == "A" else "A", "tie"]
    for index, choice in enumerate(choices):
        assert session.next_unrated() == index
        record = session.rate(choice, now=1000.0 + index)
        assert record["prompt"] == f"prompt {index}" and record["time"] == 1000.0 + index
        assert (record["answer_a"], record["answer_b"]) == (session.item(index).answer_a, session.item(index).answer_b)
    assert session.rate("A") is None  # nothing left: nothing recorded
    records = read_ratings(tmp_path)
    assert [r["winner"] for r in records] == [FINETUNED, FINETUNED, BASE, "tie"]
    assert all(r["adapter"] == str(tmp_path / "adapter") and r["sampling"]["greedy"] is True for r in records)

    done = session.view(blind_mode=True)
    assert done.visible and done.all_rated and done.item is None and done.rated == 4
    assert done.win_rate.startswith("Fine-tuned answer preferred in 2 of 4 blind ratings (50%)")
    hidden = session.view(blind_mode=False)
    assert not hidden.visible and hidden.item is None and not hidden.all_rated


def test_a_bad_choice_is_refused_and_the_session_does_not_move(tmp_path):
    session = session_with_rows(tmp_path)
    with pytest.raises(RunError, match="'C' is not a rating"):
        session.rate("C")
    assert session.next_unrated() == 0 and read_ratings(tmp_path) == []


def test_one_win_rate_owner_for_the_cell_the_lineage_and_the_sentence(tmp_path):
    assert format_win_rate_cell(tmp_path) == "" and win_rate_record(tmp_path) == {"win_rate": None, "wins": 0,
                                                                                   "count": 0}
    session = session_with_rows(tmp_path, ROWS[:3])
    for index in range(3):
        session.rate(tuned_letter(session.item(index)) if index < 2 else "both bad")
    (tmp_path / "ratings.jsonl").open("a").write('["not a rating"]\nnot json\n')  # ignored, not fatal
    assert win_rate(tmp_path) == (2 / 3, 2, 3)
    assert format_win_rate_cell(tmp_path) == "67% (2/3)"
    assert win_rate_record(tmp_path) == {"win_rate": 2 / 3, "wins": 2, "count": 3}


def test_stop_signals_are_per_session_and_bounded():
    stops = StopSignals(keep=2)
    alice, bob = stops.fresh("alice"), stops.fresh("bob")
    assert stops.stop("alice") is True and alice.is_set() and not bob.is_set()
    again = stops.fresh("alice")  # a new generation gets a clear event
    assert not again.is_set()
    stops.fresh("carol")  # the least recently started session is dropped
    assert stops.stop("bob") is False and not bob.is_set()
    assert stops.stop("nobody") is False


def test_sampling_checks_what_transformers_checks_and_our_ranges():
    with pytest.raises(ConfigError, match=r"^max_new_tokens: must be a positive integer, got 0\.$"):
        Sampling(max_new_tokens=0).validated()
    with pytest.raises(ConfigError, match=r"^max_new_tokens: must be a positive integer, got 1\.5\.$"):
        Sampling(max_new_tokens=1.5).validated()
    with pytest.raises(ConfigError, match=r"^temperature: must be from 0 to 5, got 7\.$"):
        Sampling(temperature=7).validated()
    with pytest.raises(ConfigError, match=r"^repetition_penalty: must be above 0"):
        Sampling(repetition_penalty=0).validated()
    assert Sampling(temperature=0).validated().is_greedy  # greedy drops sampling flags: transformers accepts it


# ----------------------------------------------------------------------------- the tab's handlers
def test_rate_handler_shows_the_next_prompt_and_the_tally(tmp_path):
    from ui import chat_tab

    session = session_with_rows(tmp_path, ROWS[:2])
    visible, prompt, answer_a, answer_b, tally = chat_tab.rating_panel(session, True)
    assert visible["visible"] is True and prompt.startswith("**Prompt 1 of 2** (0 rated)\n\nprompt 0")
    assert (answer_a, answer_b) == (session.item(0).answer_a, session.item(0).answer_b)
    assert "Reference answer" not in prompt

    same, visible, prompt, answer_a, answer_b, tally = chat_tab.rate("A", session)
    assert same is session and prompt.startswith("**Prompt 2 of 2** (1 rated)")
    assert prompt.endswith("*Reference answer:* reference 1") and "of 1 blind rating" in tally
    *_, prompt, _, _, tally = chat_tab.rate("tie", session)
    assert prompt == "All answers in this table are rated." and "of 2 blind ratings" in tally
    assert chat_tab.rate("B", session)[2] == prompt and len(read_ratings(tmp_path)) == 2
    assert chat_tab.rate("A", None)[1]["visible"] is False  # no batch yet: nothing to rate, nothing breaks

    headers_blind = chat_tab.table_rows(session, True)
    assert [row[1:3] for row in headers_blind] == [[session.item(i).answer_a, session.item(i).answer_b]
                                                   for i in range(2)]
    assert [row[1:3] for row in chat_tab.table_rows(session, False)] == [[r["base"], r["finetuned"]]
                                                                         for r in ROWS[:2]]


def test_rate_handler_reports_a_write_failure_in_words(tmp_path):
    from ui import chat_tab

    session = session_with_rows(tmp_path, ROWS[:1])
    (tmp_path / "ratings.jsonl").mkdir()  # cannot be appended to
    result = chat_tab.rate("A", session)
    assert result[-1].startswith("**Unexpected error** (IsADirectoryError)") and session.next_unrated() == 0


def test_stop_handler_stops_only_the_session_that_pressed_it(tmp_path):
    from ui import chat_tab
    from ui.context import AppContext

    ctx = AppContext(runs_dir=tmp_path, exports_dir=tmp_path)
    first = ctx.chat_stops.fresh("session-1")
    second = ctx.chat_stops.fresh("session-2")
    assert chat_tab.stop_generation(ctx, SimpleNamespace(session_hash="session-2")) == "Stopping…"
    assert second.is_set() and not first.is_set()
    # Nothing was loaded: the handlers answer in words instead of raising.
    updates = list(chat_tab.send(ctx, "hello", [], [], "", 0.7, 0.95, 16, 1.0, 0, True))
    assert updates[-1][-1] == f"**Error:** {chat_tab.NOT_LOADED}"
    batch = list(chat_tab.run_batch(ctx, chat_tab.SOURCE_LINES, None, "a\nb", 0, True, "", 0.7, 0.95, 16, 1.0, 0,
                                    True))
    assert batch[-1][0] == f"**Error:** {chat_tab.NOT_LOADED}"
    assert ctx.chat is not None and not ctx.chat.loaded  # made on first use, loads nothing by itself


def test_bound_handlers_keep_what_gradio_looks_for(tmp_path):
    """``bind`` must keep the gr.Request hint (per-session stop) and generator-ness (streaming)."""
    import inspect

    import gradio as gr
    from gradio.helpers import special_args

    from ui import chat_tab
    from ui.context import AppContext, bind

    ctx = AppContext(runs_dir=tmp_path, exports_dir=tmp_path)
    send = bind(chat_tab.send, ctx)
    assert inspect.isgeneratorfunction(send) and "ctx" not in inspect.signature(send).parameters
    request = gr.Request(username=None, session_hash="abc")
    inputs, *_ = special_args(send, inputs=["hi", [], [], "", 0.7, 0.95, 16, 1.0, 0, True], request=request)
    assert inputs[-1] is request
    stop = bind(chat_tab.stop_generation, ctx)
    event = ctx.chat_stops.fresh("abc")
    inputs, *_ = special_args(stop, inputs=[], request=request)
    assert stop(*inputs) == "Stopping…" and event.is_set()
    assert not inspect.isgeneratorfunction(stop)  # plain functions stay plain
