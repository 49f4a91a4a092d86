"""Chat tab: the fine-tuned model beside its base (or beside another adapter of that base, such as a release's
previous version) on the same prompt, and blind A/B rating.

Layout, wiring and module-level handlers of plain values. Loading, generation, prompt sets and
the rating state machine are ``engine.chat``; the app holds one ``engine.chat.ChatModels`` (one
base in memory, several adapters) in ``ctx.chat``, and one stop event per browser session in
``ctx.chat_stops``: generation checks it at every token, and the stop buttons also cancel the UI
events. The batch being rated is an ``engine.chat.BlindSession`` in the browser session's state.
"""

from __future__ import annotations

import gradio as gr

from engine.chat import (
    LATEST,
    BlindSession,
    ChatModels,
    Sampling,
    adapter_options,
    clean_messages,
    held_out_prompts,
    prompts_from_file,
    prompts_from_lines,
    with_system_prompt,
)
from engine.chat.ratings import describe_win_rate, win_rate
from engine.errors import ConfigError, LoraLabError
from engine.releases import chat_source, list_releases
from engine.training.rundir import list_runs, resolve_run
from ui import fields
from ui.context import AppContext, bind, releases_folder

SOURCE_HELD_OUT, SOURCE_FILE, SOURCE_LINES = "Run's held-out split", "File", "Typed lines"
LABELED_HEADERS = ["prompt", "base answer", "fine-tuned answer", "reference", "base F1", "fine-tuned F1"]
BLIND_HEADERS = ["prompt", "answer A", "answer B", "reference"]
CHOICE_BUTTONS = (("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both bad", "both_bad"))
NOT_LOADED = "No model is loaded: choose a run (or an adapter folder) and press Load first."


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _error_text(error: Exception) -> str:
    if isinstance(error, LoraLabError):
        return f"**Error:** {error}"
    return f"**Unexpected error** ({type(error).__name__}): {error}"


def _markdown_lines(text: str) -> str:
    return text.replace("\n", "  \n")  # a Markdown hard line break per engine line


def _number(value, default, whole: bool = False):
    """A form value as a number when it is one; anything else is passed on for Sampling's sentence."""
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    if whole and number.is_integer():
        return int(number)
    return number


def _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy) -> Sampling:
    return Sampling(temperature=_number(temperature, Sampling.temperature), top_p=_number(top_p, Sampling.top_p),
                    max_new_tokens=_number(max_new_tokens, Sampling.max_new_tokens, whole=True),
                    repetition_penalty=_number(repetition_penalty, Sampling.repetition_penalty),
                    seed=_number(seed, 0, whole=True), greedy=bool(greedy)).validated()


def chat_models(ctx: AppContext) -> ChatModels:
    """The app's one ``ChatModels``, made on first use (it loads nothing until Load is pressed)."""
    if ctx.chat is None:
        ctx.chat = ChatModels()
    return ctx.chat


# ----------------------------------------------------------------------------- choosing and loading
def run_choices(runs_dir) -> list[tuple[str, str]]:
    choices = []
    for run in list_runs(runs_dir):
        note = "" if run.has_adapter or adapter_options(run.path) else ", no adapter yet"
        choices.append((f"{run.name} ({run.state}, {run.method}, {run.base_model}{note})", run.name))
    return choices


def release_choices(releases_dir) -> list[tuple[str, str]]:
    """(label, name) of each release that has a current version, with its current and previous."""
    choices = []
    for row in list_releases(releases_dir):
        if row.get("current"):
            previous = f", previous v{row['previous']}" if row.get("previous") else ", no previous version"
            choices.append((f"{row['name']} (current v{row['current']}{previous})", row["name"]))
    return choices


def refresh_releases(ctx: AppContext, current):
    choices = release_choices(releases_folder(ctx))
    names = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in names else (names[0] if names else None))


def load_release_pair(ctx: AppContext, name):
    """Current (right) beside previous (left) of release ``name``, on one base; returns what the folder and
    left-side boxes now hold, the load state and the win rate of current over previous."""
    if not name:
        return gr.update(), gr.update(), "**Error:** choose a release first (promote one in the Export tab).", \
            gr.update()
    folder, against = f"release:{name}@current", f"release:{name}@previous"
    state, rate = load_adapter(ctx, None, None, folder, against)
    return folder, against, state, rate


def side_labels(ctx: AppContext):
    """The two chat columns' labels for what is loaded: left (base or another adapter), right (the adapter)."""
    labels = chat_models(ctx).side_labels()
    return gr.update(label=f"Left: {labels['base']}"), gr.update(label=f"Right: {labels['finetuned']}")


def refresh_runs(runs_dir, current):
    choices = run_choices(runs_dir)
    names = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in names else (names[0] if names else None))


def _adapter_dropdown(runs_dir, run_name) -> dict:
    try:
        options = adapter_options(resolve_run(runs_dir, run_name)) if run_name else []
    except LoraLabError:
        options = []
    return {"choices": options or [("latest adapter", LATEST)], "value": LATEST}


def adapter_choices(runs_dir, run_name):
    return gr.update(**_adapter_dropdown(runs_dir, run_name))


def load_adapter(ctx: AppContext, run_name, which, folder, against=None):
    """Load the chosen run's adapter (or the adapter folder or release, when one is typed) on the right, and on the
    left the base with the adapter off or, when ``against`` is typed, that adapter of the same base; returns the
    state in words and the blind win rate of this pairing."""
    models = chat_models(ctx)
    try:
        folder, against = (folder or "").strip(), (against or "").strip()
        # The folder box takes any adapter folder or release:NAME[@which]; the run box a run name inside the runs
        # folder only.
        source = chat_source(ctx.runs_dir, releases_folder(ctx), folder or (run_name or ""), which or LATEST,
                             allow_path=bool(folder))
        left = chat_source(ctx.runs_dir, releases_folder(ctx), against) if against else None
        text = _markdown_lines(models.load(source, against=left))
        rate = describe_win_rate(*win_rate(source.ratings_dir, str(left.path) if left else None),
                                 over=left.label if left else None)
        return text, rate
    except LoraLabError as error:
        return _error_text(error) + "\n\n" + (_markdown_lines(models.describe()) if models.loaded else ""), gr.update()
    except Exception as error:  # noqa: BLE001 - shown in words, never a stack trace
        return _error_text(error), gr.update()


# ----------------------------------------------------------------------------- side-by-side chat
def send(ctx: AppContext, message, base_history, tuned_history, system_prompt, temperature, top_p,
         max_new_tokens, repetition_penalty, seed, greedy, request: gr.Request = None):
    """Stream both answers; yields (message box, base chatbot, fine-tuned chatbot, status)."""
    models = chat_models(ctx)
    text = clean_messages([{"role": "user", "content": message}])[0]["content"].strip() if message else ""
    base_history, tuned_history = clean_messages(base_history), clean_messages(tuned_history)
    if not text:
        yield gr.update(), base_history, tuned_history, "Type a message first."
        return
    try:
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy)
        if not models.loaded:
            raise LoraLabError(NOT_LOADED)
    except LoraLabError as error:
        yield gr.update(), base_history, tuned_history, _error_text(error)
        return
    user = {"role": "user", "content": text}
    base_prompt = with_system_prompt(base_history + [user], system_prompt)
    tuned_prompt = with_system_prompt(tuned_history + [user], system_prompt)
    try:  # bounded before any tokens are generated: characters, then the model's context
        sampling, fitted = models.fit([base_prompt, tuned_prompt], sampling)
    except LoraLabError as error:
        yield gr.update(), base_history, tuned_history, _error_text(error)
        return
    stop = ctx.chat_stops.fresh(_session(request))
    base_view = base_history + [user, {"role": "assistant", "content": ""}]
    tuned_view = tuned_history + [user, {"role": "assistant", "content": ""}]
    labels = models.side_labels()
    yield "", base_view, tuned_view, f"Generating with {labels['base']}…"
    try:
        for base_text, tuned_text in models.stream_pair(base_prompt, tuned_prompt, sampling, stop):
            base_view[-1]["content"], tuned_view[-1]["content"] = base_text, tuned_text
            side = labels["base"] if not tuned_text else f"{labels['finetuned']} (adapter on)"
            yield "", base_view, tuned_view, f"Generating with {side}…"
    except Exception as error:  # noqa: BLE001
        yield "", base_view, tuned_view, _error_text(error)
        return
    done = "Stopped." if stop.is_set() else "Done."
    note = f" {fitted}" if fitted else ""
    yield "", base_view, tuned_view, f"{done} Same prompt and settings on both sides: {sampling.describe()}.{note}"


def stop_generation(ctx: AppContext, request: gr.Request = None):
    """Stop this browser session's generation (chat or batch) at its next token; other sessions go on."""
    ctx.chat_stops.stop(_session(request))
    return "Stopping…"


def clear_chats():
    return [], [], "Both conversations cleared."


# ----------------------------------------------------------------------------- batch comparison
def prompt_source_visibility(kind):
    """(prompts file, typed lines) shown only for the source that uses them."""
    return gr.update(visible=kind == SOURCE_FILE), gr.update(visible=kind == SOURCE_LINES)


def _prompt_set(models: ChatModels, source_kind, upload, lines, limit):
    if source_kind == SOURCE_FILE:
        if not upload:
            raise LoraLabError("Upload a prompts file first (.txt with one prompt per line, or a dataset file).")
        prompts = prompts_from_file(upload)
    elif source_kind == SOURCE_LINES:
        prompts = prompts_from_lines(lines)
        if not prompts:
            raise LoraLabError("Type at least one prompt (one per line).")
    else:
        if models.active.prompts_run is None:
            raise LoraLabError("An adapter folder outside a run has no held-out split: use a file or typed lines.")
        prompts = held_out_prompts(models.active.prompts_run)
    limit = _number(limit, 0, whole=True)
    if not isinstance(limit, int) or limit < 0:
        raise ConfigError("limit", f"must be a whole number >= 0 (0: all), got {limit!r}.")
    return prompts[:limit] if limit > 0 else prompts


def table_rows(session: BlindSession | None, blind: bool) -> list[list]:
    """The comparison table; in blind mode the columns are A and B, in each row's hidden order."""
    if session is None:
        return []
    f1 = lambda value: "" if value is None else round(value, 3)
    if blind:
        return [[item.prompt, item.answer_a, item.answer_b, item.reference or ""]
                for item in map(session.item, range(len(session.rows)))]
    return [[row["prompt"], row["base"], row["finetuned"], row.get("reference") or "", f1(row.get("base_f1")),
             f1(row.get("finetuned_f1"))] for row in session.rows]


def _table(session, blind):
    import pandas as pd

    return pd.DataFrame(table_rows(session, blind), columns=BLIND_HEADERS if blind else labeled_headers(session))


def labeled_headers(session: BlindSession | None) -> list[str]:
    """The open table's columns: base and fine-tuned, or the two adapters' labels when the left one is not the base."""
    if session is None or not session.against_label:
        return LABELED_HEADERS
    left, right = f"{session.against_label} (left)", f"{session.label} (right)"
    return ["prompt", left, right, "reference", f"{left} F1", f"{right} F1"]


def _f1_summary(rows: list[dict], labels: dict) -> str:
    scored = [r for r in rows if r.get("reference") is not None]
    if not scored:
        return ""
    mean = lambda key: sum(r[key] for r in scored) / len(scored)
    return (f" Token F1 against the reference over {len(scored)} prompt(s): {labels['base']} "
            f"{mean('base_f1'):.3f}, {labels['finetuned']} {mean('finetuned_f1'):.3f}.")


def run_batch(ctx: AppContext, source_kind, upload, lines, limit, blind, system_prompt, temperature, top_p,
              max_new_tokens, repetition_penalty, seed, greedy, request: gr.Request = None):
    """Answer every prompt with both sides; yields (status, table, blind session, rating panel...).

    The rating panel stays hidden while answers arrive and opens on the first row when the batch ends.
    """
    models = chat_models(ctx)
    try:
        if not models.loaded:
            raise LoraLabError(NOT_LOADED)
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty, seed, greedy)
        prompts = _prompt_set(models, source_kind, upload, lines, limit)
    except Exception as error:  # noqa: BLE001
        yield (_error_text(error), gr.update(), gr.update(), *rating_panel(None, bool(blind)))
        return
    stop = ctx.chat_stops.fresh(_session(request))
    session = BlindSession.start(models.active, {**sampling.as_dict(), "system_prompt": system_prompt or ""},
                                 against=models.against)
    yield (f"Answering {len(prompts)} prompt(s) with both sides…", _table(session, blind), session,
           *rating_panel(None, bool(blind)))
    try:
        for row in models.compare(prompts, sampling, system_prompt=system_prompt, stop_event=stop):
            session.add(row.as_dict())
            yield (f"Answered {len(session.rows)} of {len(prompts)}…", _table(session, blind), session,
                   *rating_panel(None, bool(blind)))
    except Exception as error:  # noqa: BLE001
        yield (_error_text(error), _table(session, blind), session, *rating_panel(session, bool(blind)))
        return
    done = "Stopped" if stop.is_set() else "Done"
    status = (f"{done}: {len(session.rows)} of {len(prompts)} prompt(s) answered by both sides."
              f"{_f1_summary(session.rows, models.side_labels())}")
    if blind:
        status += " Rate them below: answers are shown as A and B in random order."
    yield (status, _table(session, blind), session, *rating_panel(session, bool(blind)))


def toggle_blind(session, blind):
    return (_table(session, blind), *rating_panel(session, bool(blind)))


# ----------------------------------------------------------------------------- blind rating
def rating_panel(session: BlindSession | None, blind: bool):
    """(panel visibility, prompt text, answer A, answer B, win-rate text): the session's view, in Markdown."""
    if session is None:
        return gr.update(visible=False), "", "", "", gr.update()
    view = session.view(bool(blind))
    if view.item is None:
        prompt = "All answers in this table are rated." if view.all_rated else ""
        return gr.update(visible=view.visible), prompt, "", "", view.win_rate
    prompt = f"**Prompt {view.position} of {view.total}** ({view.rated} rated)\n\n{view.item.prompt}"
    if view.item.reference:
        prompt += f"\n\n*Reference answer:* {view.item.reference}"
    return gr.update(visible=True), prompt, view.item.answer_a, view.item.answer_b, view.win_rate


def rate(choice: str, session: BlindSession | None):
    """Record ``choice`` for the next unrated row and show the one after; nothing is recorded once all are rated."""
    try:
        if session is not None:
            session.rate(choice)
        return (session, *rating_panel(session, True))
    except Exception as error:  # noqa: BLE001 - an unwritable ratings file, say: the panel stays, the tally says why
        return (session, gr.update(), gr.update(), gr.update(), gr.update(), _error_text(error))


# ----------------------------------------------------------------------------- layout
def build(ctx: AppContext) -> None:
    models = chat_models(ctx)
    runs_dir = ctx.runs_dir

    gr.Markdown(
        "Chat with the **base model** (left, adapter off) and the **fine-tuned model** (right, adapter on) on the "
        "same prompt, system prompt, sampling settings and seed, so differences come from the adapter. "
        "Both run on one copy of the base model. The left side can instead be another adapter of the same base: "
        "a release's previous version beside its current one, or a sibling run.")
    with gr.Row():
        initial = run_choices(runs_dir)
        run_box = gr.Dropdown(label="Run", choices=initial, value=initial[0][1] if initial else None, scale=3,
                              info="Finished, stopped or still running.")
        adapter_box = gr.Dropdown(label="Adapter", scale=2, info="The latest one, or a checkpoint.",
                                  **_adapter_dropdown(runs_dir, initial[0][1] if initial else None))
        folder_box = gr.Textbox(label="…or any PEFT adapter folder, or a release", scale=3,
                                placeholder="/path/to/adapter, release:NAME or release:NAME@previous",
                                info="When filled, used on the right instead of the run. Releases load on the same "
                                     "base, so current and previous switch without reloading it.")
        with gr.Column(scale=1, min_width=120):
            refresh_button = gr.Button("Refresh runs", size="sm")
            load_button = gr.Button("Load", variant="primary")
    with gr.Row():
        against_box = gr.Textbox(label="Left side (empty: the base, adapter off)", scale=4,
                                 placeholder="release:NAME@previous, a run name or an adapter folder of the same base",
                                 info="Another adapter of the same base answers on the left; both share one copy "
                                      "of the base.")
        initial_releases = release_choices(releases_folder(ctx))
        release_box = gr.Dropdown(label="Release", choices=initial_releases, scale=3,
                                  value=initial_releases[0][1] if initial_releases else None,
                                  info="Promoted in the Export tab (or `python -m engine release promote`).")
        with gr.Column(scale=1, min_width=120):
            release_refresh = gr.Button("Refresh releases", size="sm")
            pair_button = gr.Button("Current vs previous")
    load_state = gr.Markdown(_markdown_lines(models.describe()), elem_classes=["loralab-status"])

    with gr.Accordion("Generation settings (the same for both sides)", open=False):
        system_box = gr.Textbox(label="System prompt", lines=2, placeholder="Optional; put before every conversation.")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=Sampling.top_p, step=0.01, label="Top-p")
            max_new_tokens = fields.Number(Sampling.max_new_tokens, label="Max new tokens", precision=0, minimum=1)
            repetition_penalty = gr.Slider(0.5, 2, value=Sampling.repetition_penalty, step=0.05,
                                           label="Repetition penalty")
            seed = fields.Number(Sampling.seed, label="Seed", precision=0, minimum=0)

    with gr.Row():
        labels = models.side_labels()
        base_chat = gr.Chatbot(label=f"Left: {labels['base']}", height=420, feedback_options=None)
        tuned_chat = gr.Chatbot(label=f"Right: {labels['finetuned']}", height=420, feedback_options=None)
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
        limit = fields.Number(10, label="At most this many prompts (0: all)", precision=0, minimum=0, scale=1)
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

    with gr.Group(visible=False) as panel_group:
        rating_prompt = gr.Markdown()
        with gr.Row():
            answer_a = gr.Textbox(label="Answer A", lines=6, interactive=False)
            answer_b = gr.Textbox(label="Answer B", lines=6, interactive=False)
        with gr.Row():
            choice_buttons = [(gr.Button(text), value) for text, value in CHOICE_BUTTONS]
    win_text = gr.Markdown("No blind ratings yet.")
    panel_outputs = [panel_group, rating_prompt, answer_a, answer_b, win_text]

    # ------------------------------------------------------------------ wiring
    # One load or generation at a time for the whole app (one model in memory), queued in its own group, so
    # chat never holds a worker thread waiting on the model's lock nor delays the Train tab's updates.
    generation = dict(concurrency_id="chat", concurrency_limit=1)
    refresh_button.click(bind(refresh_runs, runs_dir), run_box, run_box, api_name="refresh_runs")
    run_box.focus(bind(refresh_runs, runs_dir), run_box, run_box, api_visibility="private")
    run_box.change(bind(adapter_choices, runs_dir), run_box, adapter_box, api_name="adapter_choices")
    load_button.click(bind(load_adapter, ctx), [run_box, adapter_box, folder_box, against_box],
                      [load_state, win_text], api_name="load", **generation
                      ).then(bind(side_labels, ctx), None, [base_chat, tuned_chat], api_visibility="private")
    release_refresh.click(bind(refresh_releases, ctx), release_box, release_box, api_name="refresh_releases")
    pair_button.click(bind(load_release_pair, ctx), release_box, [folder_box, against_box, load_state, win_text],
                      api_name="load_release_pair", **generation
                      ).then(bind(side_labels, ctx), None, [base_chat, tuned_chat], api_visibility="private")

    chat_inputs = [message, base_chat, tuned_chat, system_box, *sampling_inputs]
    chat_outputs = [message, base_chat, tuned_chat, chat_status]
    send_event = send_button.click(bind(send, ctx), chat_inputs, chat_outputs, api_name="send",
                                   show_progress="minimal", **generation)
    submit_event = message.submit(bind(send, ctx), chat_inputs, chat_outputs, api_visibility="private",
                                  show_progress="minimal", **generation)
    clear_button.click(clear_chats, None, [base_chat, tuned_chat, chat_status], api_name="clear")

    batch_event = batch_button.click(
        bind(run_batch, ctx), [source_kind, prompt_file, prompt_lines, limit, blind, system_box, *sampling_inputs],
        [batch_status, table, batch_state, *panel_outputs], api_name="batch", **generation)
    running = [send_event, submit_event, batch_event]
    # The stop event ends generation inside the model at the next token; cancelling the UI events
    # alone would leave the worker thread generating.
    stop_button.click(bind(stop_generation, ctx), None, chat_status, cancels=running, queue=False, api_name="stop")
    batch_stop_button.click(bind(stop_generation, ctx), None, batch_status, cancels=running, queue=False,
                            api_visibility="private")

    source_kind.change(prompt_source_visibility, source_kind, [prompt_file, prompt_lines], api_visibility="private")
    blind.change(toggle_blind, [batch_state, blind], [table, *panel_outputs], api_visibility="private")
    for button, value in choice_buttons:
        button.click(bind(rate, value), batch_state, [batch_state, *panel_outputs], api_name=f"rate_{value.lower()}")
