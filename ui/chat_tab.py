"""Chat tab: the fine-tuned model beside its base on the same prompt, and blind A/B rating.

Layout and wiring only. Loading, generation, prompt sets and ratings are ``engine.chat.models*``;
the app holds one ``engine.chat.models.ChatModels`` (one base in memory, several adapters), kept in
``ctx.chat``. Stop works through a per-browser-session ``threading.Event``
that generation checks at every token, and the stop buttons also cancel the UI events.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import gradio as gr

from engine.chat import (
    LATEST, ChatModels, Sampling, adapter_options, clean_messages, held_out_prompts, prompts_from_file,
    prompts_from_lines, resolve_adapter, with_system_prompt,
)
from engine.chat.ratings import (
    FINETUNED, BlindItem, describe_win_rate, make_blind_items, record_rating, win_rate,
)
from engine.errors import LoraLabError
from engine.training.rundir import list_runs

SOURCE_HELD_OUT, SOURCE_FILE, SOURCE_LINES = "Run's held-out split", "File", "Typed lines"
LABELED_HEADERS = ["prompt", "base answer", "fine-tuned answer", "reference", "base F1", "fine-tuned F1"]
BLIND_HEADERS = ["prompt", "answer A", "answer B", "reference"]
CHOICE_BUTTONS = (("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both bad", "both_bad"))

# One stop event per browser session; bounded so abandoned sessions cannot pile up.
_stop_events: OrderedDict[str, threading.Event] = OrderedDict()
_stop_lock = threading.Lock()
MAX_SESSIONS = 256


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _fresh_stop_event(request) -> threading.Event:
    with _stop_lock:
        event = threading.Event()
        _stop_events[_session(request)] = event
        _stop_events.move_to_end(_session(request))
        while len(_stop_events) > MAX_SESSIONS:
            _stop_events.popitem(last=False)
        return event


def _error_text(error: Exception) -> str:
    if isinstance(error, LoraLabError):
        return f"**Error:** {error}"
    return f"**Unexpected error** ({type(error).__name__}): {error}"


def _markdown_lines(text: str) -> str:
    return text.replace("\n", "  \n")  # a Markdown hard line break per engine line


def _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy) -> Sampling:
    as_int = lambda value, default: default if value in (None, "") else int(value)
    return Sampling(temperature=float(temperature), top_p=float(top_p),
                    max_new_tokens=as_int(max_new_tokens, Sampling.max_new_tokens),
                    repetition_penalty=float(repetition_penalty), seed=as_int(seed, 0),
                    greedy=bool(greedy)).validated()


# ----------------------------------------------------------------------------- choosing and loading
def run_choices(runs_dir) -> list[tuple[str, str]]:
    choices = []
    for run in list_runs(runs_dir):
        note = "" if run.has_adapter or adapter_options(run.path) else ", no adapter yet"
        choices.append((f"{run.name} ({run.state}, {run.method}, {run.base_model}{note})", run.name))
    return choices


def refresh_runs(runs_dir, current):
    choices = run_choices(runs_dir)
    names = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in names else (names[0] if names else None))


def _adapter_dropdown(runs_dir, run_name) -> dict:
    from engine.training.rundir import resolve_run

    try:
        options = adapter_options(resolve_run(runs_dir, run_name)) if run_name else []
    except LoraLabError:
        options = []
    return {"choices": options or [("latest adapter", LATEST)], "value": LATEST}


def adapter_choices(runs_dir, run_name):
    return gr.update(**_adapter_dropdown(runs_dir, run_name))


def load_adapter(models: ChatModels, runs_dir, run_name, which, folder):
    """Load the chosen run's adapter (or the adapter folder, when one is typed); returns the state in words."""
    try:
        target = (folder or "").strip() or (run_name or "")
        source = resolve_adapter(runs_dir, target, which or LATEST)
        text = _markdown_lines(models.load(source))
        rate = describe_win_rate(*win_rate(source.ratings_dir))
        return text, rate
    except LoraLabError as error:
        return _error_text(error) + "\n\n" + (_markdown_lines(models.describe()) if models.loaded else ""), gr.update()
    except Exception as error:  # noqa: BLE001 - shown in words, never a stack trace
        return _error_text(error), gr.update()


# ----------------------------------------------------------------------------- side-by-side chat
def send(models: ChatModels, message, base_history, tuned_history, system_prompt, temperature, top_p,
         max_new_tokens, repetition_penalty, seed, greedy, request: gr.Request = None):
    """Stream both answers; yields (message box, base chatbot, fine-tuned chatbot, status)."""
    text = clean_messages([{"role": "user", "content": message}])[0]["content"].strip() if message else ""
    base_history, tuned_history = clean_messages(base_history), clean_messages(tuned_history)
    if not text:
        yield gr.update(), base_history, tuned_history, "Type a message first."
        return
    try:
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy)
        if not models.loaded:
            raise LoraLabError("No model is loaded: choose a run (or an adapter folder) and press Load first.")
    except LoraLabError as error:
        yield gr.update(), base_history, tuned_history, _error_text(error)
        return
    stop = _fresh_stop_event(request)
    user = {"role": "user", "content": text}
    base_prompt = with_system_prompt(base_history + [user], system_prompt)
    tuned_prompt = with_system_prompt(tuned_history + [user], system_prompt)
    base_view = base_history + [user, {"role": "assistant", "content": ""}]
    tuned_view = tuned_history + [user, {"role": "assistant", "content": ""}]
    label = models.active.label
    yield "", base_view, tuned_view, "Generating with the base (adapter off)…"
    try:
        for base_text, tuned_text in models.stream_pair(base_prompt, tuned_prompt, sampling, stop):
            base_view[-1]["content"], tuned_view[-1]["content"] = base_text, tuned_text
            side = "the base (adapter off)" if not tuned_text else f"{label} (adapter on)"
            yield "", base_view, tuned_view, f"Generating with {side}…"
    except Exception as error:  # noqa: BLE001
        yield "", base_view, tuned_view, _error_text(error)
        return
    done = "Stopped." if stop.is_set() else "Done."
    yield "", base_view, tuned_view, f"{done} Same prompt and settings on both sides: {sampling.describe()}."


def stop_generation(request: gr.Request = None):
    with _stop_lock:
        event = _stop_events.get(_session(request))
    if event is not None:
        event.set()
    return "Stopping…"


def clear_chats():
    return [], [], "Both conversations cleared."


# ----------------------------------------------------------------------------- batch comparison
def _prompt_set(runs_dir, models: ChatModels, source_kind, upload, lines, limit):
    if source_kind == SOURCE_FILE:
        if not upload:
            raise LoraLabError("Upload a prompts file first (.txt with one prompt per line, or a dataset file).")
        prompts = prompts_from_file(upload)
    elif source_kind == SOURCE_LINES:
        prompts = prompts_from_lines(lines)
        if not prompts:
            raise LoraLabError("Type at least one prompt (one per line).")
    else:
        if models.active.run_dir is None:
            raise LoraLabError("An adapter folder outside a run has no held-out split: use a file or typed lines.")
        prompts = held_out_prompts(models.active.run_dir)
    limit = int(limit or 0)
    return prompts[:limit] if limit > 0 else prompts


def table_rows(batch: dict | None, blind: bool) -> list[list]:
    """The comparison table; in blind mode the columns are A and B, in each row's hidden order."""
    rows = []
    for row in (batch or {}).get("rows", []):
        if blind:
            a, b = (row["finetuned"], row["base"]) if row["a_side"] == FINETUNED else (row["base"], row["finetuned"])
            rows.append([row["prompt"], a, b, row.get("reference") or ""])
        else:
            f1 = lambda value: "" if value is None else round(value, 3)
            rows.append([row["prompt"], row["base"], row["finetuned"], row.get("reference") or "",
                         f1(row.get("base_f1")), f1(row.get("finetuned_f1"))])
    return rows


def _table(batch, blind):
    import pandas as pd

    return pd.DataFrame(table_rows(batch, blind), columns=BLIND_HEADERS if blind else LABELED_HEADERS)


def _f1_summary(rows: list[dict]) -> str:
    scored = [r for r in rows if r.get("reference") is not None]
    if not scored:
        return ""
    mean = lambda key: sum(r[key] for r in scored) / len(scored)
    return (f" Token F1 against the reference over {len(scored)} prompt(s): base {mean('base_f1'):.3f}, "
            f"fine-tuned {mean('finetuned_f1'):.3f}.")


def run_batch(models: ChatModels, runs_dir, source_kind, upload, lines, limit, blind, system_prompt, temperature,
              top_p, max_new_tokens, repetition_penalty, seed, greedy, request: gr.Request = None):
    """Answer every prompt with both sides; yields (status, table, batch state, rating panel...)."""
    try:
        if not models.loaded:
            raise LoraLabError("No model is loaded: choose a run (or an adapter folder) and press Load first.")
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy)
        prompts = _prompt_set(runs_dir, models, source_kind, upload, lines, limit)
    except Exception as error:  # noqa: BLE001
        yield (_error_text(error), gr.update(), gr.update(), *_rating_panel(None, bool(blind)))
        return
    stop = _fresh_stop_event(request)
    source = models.active
    batch = {"rows": [], "rated": [], "label": source.label, "adapter": str(source.path),
             "ratings_dir": str(source.ratings_dir), "base_model": source.base_model,
             "sampling": {**sampling.as_dict(), "system_prompt": system_prompt or ""}}
    yield (f"Answering {len(prompts)} prompt(s) with both sides…", _table(batch, blind), batch,
           *_rating_panel(None, bool(blind)))
    try:
        for row in models.compare(prompts, sampling, system_prompt=system_prompt, stop_event=stop):
            record = row.as_dict()
            record["a_side"] = make_blind_items([record])[0].a_side
            batch["rows"].append(record)
            batch["rated"].append(False)
            yield (f"Answered {len(batch['rows'])} of {len(prompts)}…", _table(batch, blind), batch,
                   *_rating_panel(None, bool(blind)))
    except Exception as error:  # noqa: BLE001
        yield (_error_text(error), _table(batch, blind), batch, *_rating_panel(batch, bool(blind)))
        return
    done = "Stopped" if stop.is_set() else "Done"
    status = f"{done}: {len(batch['rows'])} of {len(prompts)} prompt(s) answered by both sides.{_f1_summary(batch['rows'])}"
    if blind:
        status += " Rate them below: answers are shown as A and B in random order."
    yield (status, _table(batch, blind), batch, *_rating_panel(batch, bool(blind)))


def toggle_blind(batch, blind):
    return (_table(batch, blind), *_rating_panel(batch, bool(blind)))


# ----------------------------------------------------------------------------- blind rating
def _next_unrated(batch) -> int | None:
    return next((i for i, rated in enumerate((batch or {}).get("rated", [])) if not rated), None)


def _rating_panel(batch, blind: bool):
    """(panel visibility, prompt text, answer A, answer B, win-rate text) for the next unrated row."""
    index = _next_unrated(batch) if blind else None
    rate_text = describe_win_rate(*win_rate(batch["ratings_dir"])) if batch else gr.update()
    if index is None:
        done = blind and batch and batch.get("rows")
        prompt = "All answers in this table are rated." if done else ""
        return gr.update(visible=bool(done)), prompt, "", "", rate_text
    row = batch["rows"][index]
    a, b = (row["finetuned"], row["base"]) if row["a_side"] == FINETUNED else (row["base"], row["finetuned"])
    rated = sum(batch["rated"])
    prompt = f"**Prompt {index + 1} of {len(batch['rows'])}** ({rated} rated)\n\n{row['prompt']}"
    if row.get("reference"):
        prompt += f"\n\n*Reference answer:* {row['reference']}"
    return gr.update(visible=True), prompt, a, b, rate_text


def rate(batch, choice: str):
    """Record the choice for the next unrated row and show the one after."""
    index = _next_unrated(batch)
    if index is None:
        return (batch, *_rating_panel(batch, True))
    row = batch["rows"][index]
    a, b = (row["finetuned"], row["base"]) if row["a_side"] == FINETUNED else (row["base"], row["finetuned"])
    item = BlindItem(prompt=row["prompt"], answer_a=a, answer_b=b, a_side=row["a_side"], reference=row.get("reference"))
    from pathlib import Path

    from engine.training.rundir import RunPaths

    record_rating(RunPaths(Path(batch["ratings_dir"])).ratings, item, choice, sampling=batch["sampling"],
                  adapter=batch["adapter"], base_model=batch["base_model"])
    batch["rated"][index] = True
    return (batch, *_rating_panel(batch, True))


# ----------------------------------------------------------------------------- layout
def build(ctx) -> None:
    if ctx.chat is None:
        ctx.chat = ChatModels()
    models: ChatModels = ctx.chat
    runs_dir = ctx.runs_dir

    gr.Markdown(
        "Chat with the **base model** (left, adapter off) and the **fine-tuned model** (right, adapter on) on the "
        "same prompt, system prompt, sampling settings and seed, so differences come from the adapter. "
        "Both run on one copy of the base model.")
    with gr.Row():
        initial = run_choices(runs_dir)
        run_box = gr.Dropdown(label="Run", choices=initial, value=initial[0][1] if initial else None, scale=3,
                              info="Finished, stopped or still running.")
        adapter_box = gr.Dropdown(label="Adapter", scale=2, info="The latest one, or a checkpoint.",
                                  **_adapter_dropdown(runs_dir, initial[0][1] if initial else None))
        folder_box = gr.Textbox(label="…or any PEFT adapter folder", placeholder="/path/to/adapter", scale=3,
                                info="When filled, used instead of the run.")
        with gr.Column(scale=1, min_width=120):
            refresh_button = gr.Button("Refresh runs", size="sm")
            load_button = gr.Button("Load", variant="primary")
    load_state = gr.Markdown(_markdown_lines(models.describe()), elem_classes=["loralab-status"])

    with gr.Accordion("Generation settings (the same for both sides)", open=False):
        system_box = gr.Textbox(label="System prompt", lines=2, placeholder="Optional; put before every conversation.")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=Sampling.top_p, step=0.01, label="Top-p")
            max_new_tokens = gr.Number(Sampling.max_new_tokens, label="Max new tokens", precision=0, minimum=1)
            repetition_penalty = gr.Slider(0.5, 2, value=Sampling.repetition_penalty, step=0.05,
                                           label="Repetition penalty")
            seed = gr.Number(Sampling.seed, label="Seed", precision=0, minimum=0)

    with gr.Row():
        base_chat = gr.Chatbot(label="Base model (adapter off)", height=420, feedback_options=None)
        tuned_chat = gr.Chatbot(label="Fine-tuned model (adapter on)", height=420, feedback_options=None)
    with gr.Row():
        message = gr.Textbox(show_label=False, placeholder="Message both models (Enter sends)", scale=6)
        greedy = gr.Checkbox(False, label="Greedy", info="deterministic; ignores temperature and top-p", scale=1,
                             min_width=120)
        send_button = gr.Button("Send", variant="primary", scale=1, min_width=80)
        stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80)
        clear_button = gr.Button("Clear", scale=1, min_width=80)
    chat_status = gr.Markdown(elem_classes=["loralab-status"])
    sampling_inputs = [temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy]

    gr.Markdown("### Batch comparison and blind rating")
    with gr.Row():
        source_kind = gr.Radio([SOURCE_HELD_OUT, SOURCE_FILE, SOURCE_LINES], value=SOURCE_HELD_OUT,
                               label="Prompt set", scale=3)
        limit = gr.Number(10, label="At most this many prompts (0: all)", precision=0, minimum=0, scale=1)
        blind = gr.Checkbox(True, label="Blind mode: show answers as A and B in random order", scale=2)
    prompt_file = gr.File(label="Prompts file: .txt (one prompt per line) or a dataset file (JSONL, JSON, CSV, "
                                "Parquet; answers become the reference)", type="filepath", visible=False)
    prompt_lines = gr.Textbox(label="Prompts, one per line", lines=4, visible=False)
    with gr.Row():
        batch_button = gr.Button("Answer the prompt set with both models", variant="primary")
        batch_stop_button = gr.Button("Stop", variant="stop")
    batch_status = gr.Markdown(elem_classes=["loralab-status"])
    table = gr.Dataframe(headers=BLIND_HEADERS, interactive=False, wrap=True, label="Answers")
    batch_state = gr.State(None)

    with gr.Group(visible=False) as rating_panel:
        rating_prompt = gr.Markdown()
        with gr.Row():
            answer_a = gr.Textbox(label="Answer A", lines=6, interactive=False)
            answer_b = gr.Textbox(label="Answer B", lines=6, interactive=False)
        with gr.Row():
            choice_buttons = [(gr.Button(text), value) for text, value in CHOICE_BUTTONS]
    win_text = gr.Markdown("No blind ratings yet.")
    panel_outputs = [rating_panel, rating_prompt, answer_a, answer_b, win_text]

    # ------------------------------------------------------------------ wiring
    refresh_button.click(lambda current: refresh_runs(runs_dir, current), run_box, run_box, api_name="refresh_runs")
    run_box.focus(lambda current: refresh_runs(runs_dir, current), run_box, run_box, api_visibility="private")
    run_box.change(lambda name: adapter_choices(runs_dir, name), run_box, adapter_box, api_name="adapter_choices")
    load_button.click(lambda run, which, folder: load_adapter(models, runs_dir, run, which, folder),
                      [run_box, adapter_box, folder_box], [load_state, win_text], api_name="load")

    chat_inputs = [message, base_chat, tuned_chat, system_box, *sampling_inputs]
    chat_outputs = [message, base_chat, tuned_chat, chat_status]

    def send_handler(message, base_history, tuned_history, system_prompt, temperature, top_p, max_new_tokens,
                     repetition_penalty, seed, greedy, request: gr.Request):
        yield from send(models, message, base_history, tuned_history, system_prompt, temperature, top_p,
                        max_new_tokens, repetition_penalty, seed, greedy, request)

    send_event = send_button.click(send_handler, chat_inputs, chat_outputs, api_name="send", show_progress="minimal")
    submit_event = message.submit(send_handler, chat_inputs, chat_outputs, api_visibility="private",
                                  show_progress="minimal")
    clear_button.click(clear_chats, None, [base_chat, tuned_chat, chat_status], api_name="clear")

    def batch_handler(source_kind, upload, lines, limit, blind, system_prompt, temperature, top_p, max_new_tokens,
                      repetition_penalty, seed, greedy, request: gr.Request):
        yield from run_batch(models, runs_dir, source_kind, upload, lines, limit, blind, system_prompt, temperature,
                             top_p, max_new_tokens, repetition_penalty, seed, greedy, request)

    batch_event = batch_button.click(
        batch_handler, [source_kind, prompt_file, prompt_lines, limit, blind, system_box, *sampling_inputs],
        [batch_status, table, batch_state, *panel_outputs], api_name="batch")
    running = [send_event, submit_event, batch_event]
    # The stop event ends generation inside the model at the next token; cancelling the UI events
    # alone would leave the worker thread generating.
    stop_button.click(stop_generation, None, chat_status, cancels=running, queue=False, api_name="stop")
    batch_stop_button.click(stop_generation, None, batch_status, cancels=running, queue=False,
                            api_visibility="private")

    source_kind.change(lambda kind: (gr.update(visible=kind == SOURCE_FILE), gr.update(visible=kind == SOURCE_LINES)),
                       source_kind, [prompt_file, prompt_lines], api_visibility="private")
    blind.change(toggle_blind, [batch_state, blind], [table, *panel_outputs], api_visibility="private")
    for button, value in choice_buttons:
        button.click(_rater(value), batch_state, [batch_state, *panel_outputs], api_name=f"rate_{value.lower()}")


def _rater(choice: str):
    def handler(batch):
        return rate(batch, choice)

    return handler
