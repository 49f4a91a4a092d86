"""Dataset tab: what the model will be trained on, before a run starts.

Layout, wiring and module-level handlers of plain values; loading, rendering and counting are
``engine.data`` functions, the same ones the worker trains with. The preview reads the first
rows; the statistics run over the whole dataset as a pass in ``ctx.stats_jobs`` (an
``engine.data.report.StatsJobs``) that a ``gr.Timer`` polls by the id the session keeps.
"""

from __future__ import annotations

import json
import os

import gradio as gr

from engine.data.formats import FORMAT_CHOICES
from engine.data.preview import SHARED_TOKENIZER_USE
from ui.context import AppContext, bind

PREVIEW_ROWS = 500
PAGE_SIZE = 10
RAW_CHARS = 300
DEFAULT_MAX_LENGTH = 1024
TABLE_HEADERS = ["row", "line", "raw record", "tokens", "trained", "truncated"]
COLOR_MAP = {"trained": "#22c55e", "cut off by max_length": "#ef4444"}
LEGEND = (
    "Green: tokens the loss is computed on (assistant turns, or all of a text row). "
    "Unmarked: masked from the loss (label -100). Red: beyond `max_length`, cut off before training."
)


def _error_text(exc: Exception) -> str:
    from engine.errors import LoraLabError

    if isinstance(exc, LoraLabError):
        return f"**Error:** {exc}"
    return f"**Unexpected error** ({type(exc).__name__}): {exc}"


def _source_of(source: str, upload: str | None, max_upload_mb: float) -> str:
    """An uploaded file wins over the text box; uploads above the size cap are refused."""
    from engine.errors import DataError

    if upload:
        size_mb = os.path.getsize(upload) / 2**20
        if size_mb > max_upload_mb:
            raise DataError(
                f"The upload is {size_mb:.0f} MB, above the {max_upload_mb:.0f} MB limit; "
                "give the file's path on this machine instead."
            )
        return upload
    return (source or "").strip()


def _int(value, default: int, minimum: int = 1) -> int:
    try:
        return max(minimum, int(value))
    except (TypeError, ValueError):
        return default


def _raw_text(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= RAW_CHARS else text[: RAW_CHARS - 1] + "…"


# ----------------------------------------------------------------------------- handlers
def load_preview(ctx: AppContext, source, upload, split, fmt, columns, skip_bad, model, max_length):
    """Read the first rows; returns (status, preview state, page, table, rendered, row info, row number)."""
    from engine.data.load import load_dataset_rows

    try:
        path = _source_of(source, upload, ctx.max_upload_mb)
        loaded = load_dataset_rows(
            path, fmt or "auto", columns or None, bool(skip_bad), split or "train", limit=PREVIEW_ROWS, keep_raw=True
        )
    except Exception as exc:  # noqa: BLE001 - shown as a sentence, never a stack trace
        return _error_text(exc), None, 1, [], [], "", 1
    detected = "detected" if (fmt or "auto") == "auto" else "chosen"
    more = (
        f"the first {loaded.num_rows} rows are shown; run the statistics for the whole dataset"
        if not loaded.complete
        else f"all {loaded.num_rows} rows"
    )
    lines = [
        f"**Format:** {loaded.format} ({detected}) · **Source:** `{loaded.path}` · {more} · "
        f"**bad rows skipped:** {loaded.skipped}"
    ]
    lines += [f"- ⚠️ {w}" for w in loaded.warnings]
    preview = {"loaded": loaded, "model": model, "max_length": max_length}
    tokenizer, template, error = _tokenizer_for(preview)
    if tokenizer is None:
        lines.append(f"- ⚠️ Model: {error.removeprefix('**Error:** ')}")
    elif loaded.format != "text":
        lines += [f"- ⚠️ {w}" for w in ([template.problem] if template.problem else []) + template.warnings]
    table = _page_table(preview, 1)
    rendered, info = _render(preview, 1)
    return "\n".join(lines), preview, 1, table, rendered, info, 1


def _tokenizer_for(preview: dict):
    """(tokenizer, template, error text) for the preview's model; tokenizer None on failure."""
    from engine.data.preview import load_tokenizer, training_template

    try:
        tokenizer = load_tokenizer(preview["model"])
        return tokenizer, training_template(tokenizer), ""
    except Exception as exc:  # noqa: BLE001 - the preview still shows the rows without a tokenizer
        return None, None, _error_text(exc)


def _page_table(preview: dict | None, page: int) -> list[list]:
    if not preview:
        return []
    from engine.data.preview import encode_row

    loaded = preview["loaded"]
    max_length = _int(preview["max_length"], DEFAULT_MAX_LENGTH)
    start = (max(1, page) - 1) * PAGE_SIZE
    tokenizer, template, _ = _tokenizer_for(preview)
    table = []
    for index in range(start, min(start + PAGE_SIZE, loaded.num_rows)):
        tokens = trained = truncated = ""
        if tokenizer is not None:
            try:
                with SHARED_TOKENIZER_USE:
                    encoded = encode_row(tokenizer, loaded.rows[index], template, max_length)
                tokens, trained, truncated = encoded.length, encoded.trained_tokens, "yes" if encoded.truncated else ""
            except Exception:  # noqa: BLE001 - one row that cannot be encoded does not hide the page
                tokens = "?"
        raw = loaded.raw[index] if loaded.raw is not None else loaded.rows[index]
        table.append([index + 1, loaded.numbers[index], _raw_text(raw), tokens, trained, truncated])
    return table


def _render(preview: dict | None, row_number) -> tuple[list, str]:
    """(highlighted segments, explanation) for one previewed row."""
    if not preview:
        return [], ""
    from engine.data.preview import encode_row, render_segments

    loaded = preview["loaded"]
    index = _int(row_number, 1) - 1
    if index >= loaded.num_rows:
        return [], f"Row {index + 1} is not in the preview ({loaded.num_rows} rows loaded)."
    tokenizer, template, error = _tokenizer_for(preview)
    if tokenizer is None:
        return [], error
    max_length = _int(preview["max_length"], DEFAULT_MAX_LENGTH)
    try:
        with SHARED_TOKENIZER_USE:
            encoded = encode_row(tokenizer, loaded.rows[index], template, max_length)
            segments = render_segments(tokenizer, encoded)
    except Exception as exc:  # noqa: BLE001 - shown as a sentence, never a stack trace
        return [], _error_text(exc)
    origin = {"tokenizer": "the tokenizer's own", "trl training template": "TRL's training version of the tokenizer's"}
    info = [
        f"Row {index + 1} ({loaded.unit} {loaded.numbers[index]}): {encoded.length} tokens, "
        f"{encoded.trained_tokens} trained on. Chat template: {origin.get(template.origin, 'none')}.",
        LEGEND,
    ]
    if encoded.truncated:
        info.append(
            f"**Cut off at token {encoded.kept} of {encoded.length}** by max_length: {encoded.tokens_lost} tokens lost."
        )
    if encoded.trained_tokens == 0:
        info.append("**No token of this row is trained on**: the trainer drops it.")
    return segments, "\n\n".join(info)


def show_page(preview, page):
    page = _int(page, 1)
    if preview:
        last = max(1, -(-preview["loaded"].num_rows // PAGE_SIZE))
        page = min(page, last)
    return page, _page_table(preview, page)


def show_row(preview, row_number):
    return _render(preview, row_number)


def select_row(preview, page, event: gr.SelectData):
    row_number = (_int(page, 1) - 1) * PAGE_SIZE + event.index[0] + 1
    segments, info = _render(preview, row_number)
    return row_number, segments, info


def page_before(page) -> int:
    return max(1, _int(page, 1) - 1)


def page_after(page) -> int:
    return _int(page, 1) + 1  # show_page clamps it to the last page


def start_stats(
    ctx: AppContext, old_job, source, upload, split, fmt, columns, skip_bad, model, max_length, eval_fraction,
    eval_file, batch_size, grad_accum, seed,
):
    """Start the whole-dataset pass; returns (job id, progress text, timer)."""
    ctx.stats_jobs.cancel(old_job)  # one pass per session: a new one replaces it
    try:
        path = _source_of(source, upload, ctx.max_upload_mb)
    except Exception as exc:  # noqa: BLE001 - shown as a sentence, never a stack trace
        return None, _error_text(exc), gr.Timer(active=False)
    job_id = ctx.stats_jobs.start(
        source=path,
        fmt=fmt or "auto",
        column_map=columns or None,
        skip_bad=bool(skip_bad),
        split=split or "train",
        model=(model or "demo").strip(),
        max_length=_int(max_length, DEFAULT_MAX_LENGTH),
        eval_fraction=float(eval_fraction or 0.0) if not (eval_file or "").strip() else 0.0,
        eval_source=(eval_file or "").strip() or None,
        seed=_int(seed, 42, minimum=0),
        batch_size=_int(batch_size, 1),
        grad_accum=_int(grad_accum, 1),
    )
    return job_id, "Statistics: starting…", gr.Timer(active=True)


def poll_stats(ctx: AppContext, job_id):
    """Returns (progress text, histogram figure, figures table, warnings text, timer)."""
    job = ctx.stats_jobs.get(job_id)
    if job is None:
        return "No statistics running.", None, [], "", gr.Timer(active=False)
    snap = job.snapshot()
    if snap["state"] == "error":
        return _error_text_from(snap["error"]), None, [], "", gr.Timer(active=False)
    report = snap["report"]
    if report is None:
        partial = snap["partial"]
        rows = partial.rows if partial else 0
        text = f"Statistics: {snap['progress']:.0%} read, {rows} rows so far ({snap['elapsed']:.0f} s)."
        figure = histogram_figure(partial.lengths, partial.max_length) if partial and partial.lengths else None
        return text, figure, [], "", gr.Timer(active=True)
    done = "done" if report.complete else "stopped early (figures cover the rows read)"
    text = f"Statistics {done}: {report.rows} rows in {snap['elapsed']:.1f} s."
    warnings = "\n".join(f"- ⚠️ {w}" for w in report.warnings) or "No warnings."
    figure = histogram_figure(report.stats.lengths, report.stats.max_length)
    return text, figure, figures_table(report), warnings, gr.Timer(active=False)


def stop_stats(ctx: AppContext, job_id):
    return "Stopping…" if ctx.stats_jobs.cancel(job_id) else "No statistics running."


def _error_text_from(message: str | None) -> str:
    return f"**Error:** {message}"


def figures_table(report) -> list[list]:
    s = report.stats
    rows = [
        ["rows", report.rows],
        ["bad rows skipped", report.skipped],
        ["train rows", report.train_rows],
        ["eval rows", f"{report.eval_rows} ({report.eval_description})"],
        ["eval rows also in train", report.eval_duplicates],
        ["empty rows", s.empty_rows],
        ["exact duplicate rows", s.duplicate_rows],
    ]
    if s.tokenized:
        rows += [
            ["total tokens", s.total_tokens],
            ["mean tokens per row", round(s.mean_tokens, 1)],
            ["longest row (tokens)", s.max_tokens],
            ["tokens trained on", s.trained_tokens],
            [f"rows truncated at max_length={s.max_length}", s.truncated_rows],
            ["tokens lost to truncation", s.tokens_lost],
            ["rows with no trainable token", s.no_trainable_rows],
        ]
    rows += [
        [f"steps per epoch (batch {report.batch_size} x accumulation {report.grad_accum})", report.steps_per_epoch],
        ["sha256", report.sha256 or "(not computed: stopped early)"],
    ]
    return [[name, str(value)] for name, value in rows]


def histogram_figure(lengths: list[int], max_length: int | None):
    """Token-length histogram with the max_length line; bins counted in the engine."""
    import plotly.graph_objects as go

    from engine.data.stats import length_histogram

    starts, counts = length_histogram(lengths)
    width = (starts[1] - starts[0]) if len(starts) > 1 else 1
    figure = go.Figure(
        go.Bar(
            x=[start + width / 2 for start in starts],
            y=counts,
            width=[width] * len(starts),
            customdata=[[start, start + width - 1] for start in starts],
            hovertemplate="%{customdata[0]}-%{customdata[1]} tokens: %{y} rows<extra></extra>",
            name="rows",
        )
    )
    if max_length:
        figure.add_vline(
            x=max_length, line_dash="dash", line_color="#ef4444", annotation_text=f"max_length {max_length}"
        )
    figure.update_layout(
        xaxis_title="tokens per row (chat template applied)",
        yaxis_title="rows",
        bargap=0.05,
        height=320,
        margin=dict(l=40, r=20, t=30, b=40),
        uirevision="dataset-lengths",
    )
    return figure


# ----------------------------------------------------------------------------- layout
def _starting_values() -> dict:
    """The demo preset's settings, so the tab opens on what the demo run will train with."""
    values = dict(source="demo", model="demo", max_length=DEFAULT_MAX_LENGTH, batch=4, accumulation=1,
                  eval_fraction=0.1, seed=42)
    try:
        from engine.config import load_preset

        config = load_preset("demo-lora", [])
        values.update(
            source=config.data.path, model=config.model.name_or_path, max_length=config.train.max_length,
            batch=config.train.per_device_train_batch_size, accumulation=config.train.gradient_accumulation_steps,
            eval_fraction=config.data.eval_fraction, seed=config.train.seed,
        )
    except Exception:  # noqa: BLE001 - the tab still works with its own defaults
        pass
    return values


def build(ctx: AppContext) -> None:
    start = _starting_values()

    gr.Markdown("Check what the model will be trained on: the rows, the chat template, the loss mask and the lengths.")
    with gr.Row():
        source = gr.Textbox(
            value=start["source"],
            label="Dataset",
            info="a file path (.jsonl .json .csv .parquet), a hub id, or demo",
            scale=3,
        )
        upload = gr.File(
            label=f"…or upload a file (up to {ctx.max_upload_mb:g} MB)",
            file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet"],
            type="filepath",
            scale=2,
        )
    with gr.Row():
        fmt = gr.Dropdown(list(FORMAT_CHOICES), value="auto", label="Format")
        columns = gr.Textbox(label="Column map", placeholder="instruction=question, output=answer")
        split = gr.Textbox(value="train", label="Split (hub datasets)")
        skip_bad = gr.Checkbox(value=False, label="Skip bad rows")
    with gr.Row():
        model = gr.Textbox(value=start["model"], label="Model (tokenizer and chat template)")
        max_length = gr.Number(value=start["max_length"], precision=0, minimum=1, label="max_length")
        batch_size = gr.Number(value=start["batch"], precision=0, minimum=1, label="Batch size")
        grad_accum = gr.Number(value=start["accumulation"], precision=0, minimum=1, label="Gradient accumulation")
    with gr.Row():
        eval_fraction = gr.Slider(0.0, 0.5, value=start["eval_fraction"], step=0.01, label="Eval fraction")
        eval_file = gr.Textbox(label="Eval file (used instead of the fraction)", placeholder="path or hub id")
        seed = gr.Number(value=start["seed"], precision=0, minimum=0, label="Split seed")
    load_button = gr.Button("Load preview", variant="primary")
    status = gr.Markdown()

    preview = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                interactive=False,
                wrap=True,
                column_widths=["7%", "7%", "62%", "8%", "8%", "8%"],
                label="Raw rows (select one to render it)",
            )
            with gr.Row():
                previous_page = gr.Button("◀ Previous", size="sm")
                page = gr.Number(value=1, precision=0, minimum=1, label="Page")
                next_page = gr.Button("Next ▶", size="sm")
        with gr.Column(scale=2):
            row_number = gr.Number(value=1, precision=0, minimum=1, label="Row")
            rendered = gr.HighlightedText(
                label="As trained: chat template applied, loss mask shown",
                color_map=COLOR_MAP,
                show_legend=True,
                combine_adjacent=True,
            )
            row_info = gr.Markdown()

    with gr.Row():
        stats_button = gr.Button("Statistics over the whole dataset")
        stop_button = gr.Button("Stop", variant="stop")
    progress = gr.Markdown()
    job_id = gr.State(None)
    timer = gr.Timer(1.0, active=False)
    with gr.Row():
        histogram = gr.Plot(label="Token lengths")
        figures = gr.Dataframe(headers=["figure", "value"], interactive=False, label="Figures")
    warnings = gr.Markdown()

    settings = [source, upload, split, fmt, columns, skip_bad, model, max_length]
    # Previews and statistics starts share one small group: a slow dataset never delays the Train tab.
    reading = dict(concurrency_id="dataset", concurrency_limit=2)
    load_event = load_button.click(
        bind(load_preview, ctx),
        inputs=settings,
        outputs=[status, preview, page, table, rendered, row_info, row_number],
        api_name="load_preview",
        **reading,
    )
    stats_inputs = [job_id, *settings, eval_fraction, eval_file, batch_size, grad_accum, seed]
    load_event.success(
        bind(start_stats, ctx),
        inputs=stats_inputs,
        outputs=[job_id, progress, timer],
        api_name="start_stats_after_load",
        api_visibility="private",
        **reading,
    )
    stats_button.click(bind(start_stats, ctx), inputs=stats_inputs, outputs=[job_id, progress, timer],
                       api_name="start_stats", **reading)
    stop_button.click(bind(stop_stats, ctx), inputs=[job_id], outputs=[progress], api_name="stop_stats")
    timer.tick(
        bind(poll_stats, ctx), inputs=[job_id], outputs=[progress, histogram, figures, warnings, timer],
        api_name="poll_stats",
    )

    page.submit(show_page, inputs=[preview, page], outputs=[page, table], api_name="show_page")
    previous_page.click(page_before, inputs=[page], outputs=[page], api_visibility="private").then(
        show_page, inputs=[preview, page], outputs=[page, table], api_visibility="private"
    )
    next_page.click(page_after, inputs=[page], outputs=[page], api_visibility="private").then(
        show_page, inputs=[preview, page], outputs=[page, table], api_visibility="private"
    )
    row_number.submit(show_row, inputs=[preview, row_number], outputs=[rendered, row_info], api_name="show_row")
    table.select(select_row, inputs=[preview, page], outputs=[row_number, rendered, row_info], api_visibility="private")
