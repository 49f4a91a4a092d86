"""The Sweeps tab: vary one field of a preset (or two, a small grid), run the values one at a time, choose.

Before starting: how many runs and each one's predicted peak (the memory estimator). After:
a table per value, the loss curves overlaid and coloured by value, the Pareto charts of eval
loss against peak memory and against wall time, and one sentence recommending a run. The
work is ``engine.sweeps`` (the CLI twin is ``python -m engine sweep``); the handlers here are
module-level functions of plain values, so tests call them without a browser.
"""

from __future__ import annotations

import html
from pathlib import Path

from engine.config import field_specs, list_presets
from engine.errors import LoraLabError
from ui import charts
from ui.context import AppContext, bind

FIELD_CHOICES = ["method"] + [spec.path for spec in field_specs() if spec.path not in ("name", "description")]
EXAMPLES = ("lora.r = 4, 8, 16, 32 · train.learning_rate = 1e-4, 2e-4, 5e-4 · "
            "lora.target_modules = q_proj,v_proj | all-linear · method = lora | qlora")
PLAN_COLUMNS_TAIL = ["predicted peak (MiB)"]


def sweeps_dir(ctx: AppContext) -> Path:
    from engine.sweeps import sweeps_dir_for

    return ctx.sweeps_dir or sweeps_dir_for(ctx.runs_dir)


def _varies(field1: str | None, values1: str | None, field2: str | None, values2: str | None) -> list[str]:
    varies = [f"{field1}={values1}"]
    if field2 and (values2 or "").strip():
        varies.append(f"{field2}={values2}")
    return varies


def _overrides(text: str | None, varies: list[str] = ()) -> list[str]:
    """The ``--set`` lines; a line for a varied field is left out (the varied values win), so a form's
    settings copied in below can stay as they are."""
    varied = {item.partition("=")[0].strip() for item in varies}
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    return [line for line in lines if line.partition("=")[0].strip() not in varied]


def from_train_form(preset: str, method: str, *values) -> tuple[str, str]:
    """(the preset, its ``--set`` lines): the Train tab's form as the sweep's base, through the one diff of a
    config against its preset (``engine.config.overrides_between``), the same as its "Show command"."""
    from engine.config import load_preset, overrides_between
    from ui.train_tab import DEFAULT_PRESET, form_to_config

    config, errors = form_to_config(preset, method, *values)
    if config is None or errors:
        problems = "; ".join(str(error) for error in errors)
        return preset or DEFAULT_PRESET, f"# The Train form has problems: {problems}"
    return preset or DEFAULT_PRESET, "\n".join(overrides_between(load_preset(preset or DEFAULT_PRESET), config))


def plan_preview(preset: str, field1: str, values1: str, field2: str | None = None, values2: str | None = None,
                 overrides: str = "") -> tuple[str, list[list], list[str]]:
    """(a sentence, one row per planned run, the columns): what Start would do, or why it refuses."""
    from engine.sweeps import expand

    try:
        varies = _varies(field1, values1, field2, values2)
        plan = expand(preset, varies, _overrides(overrides, varies))
    except LoraLabError as error:
        return f"**Refused:** {html.escape(str(error))}", [], ["field"] + PLAN_COLUMNS_TAIL
    peaks = [run.predicted_peak_bytes for run in plan.runs if run.predicted_peak_bytes]
    text = (f"**{len(plan.runs)} run{'s' if len(plan.runs) != 1 else ''}**, one at a time through the job queue"
            + (f"; predicted peak {min(peaks) / 2**20:.0f} to {max(peaks) / 2**20:.0f} MiB (memory estimator)."
               if peaks else "."))
    return text, plan.table(), [v.field for v in plan.varies] + PLAN_COLUMNS_TAIL


def on_preview(preset, field1, values1, field2, values2, overrides):
    import gradio as gr

    text, rows, columns = plan_preview(preset, field1, values1, field2, values2, overrides)
    return text, gr.update(value=rows, headers=columns)


def start(ctx: AppContext, preset: str, field1: str, values1: str, field2: str | None = None,
          values2: str | None = None, overrides: str = "") -> tuple[str, str | None]:
    """Create the sweep and queue its runs on the dashboard's job manager; (a sentence, the sweep id or None)."""
    from engine.sweeps import expand, start_sweep

    if ctx.jobs is None:
        return "**Not started:** this dashboard has no job manager.", None
    try:
        varies = _varies(field1, values1, field2, values2)
        plan = expand(preset, varies, _overrides(overrides, varies))
        sweep_dir = start_sweep(plan, ctx.runs_dir, sweeps_dir(ctx), enqueue=ctx.jobs.enqueue)
    except LoraLabError as error:
        return f"**Not started:** {html.escape(str(error))}", None
    return (f"Sweep **{sweep_dir.name}** started: {len(plan.runs)} runs queued, one at a time "
            f"(CLI: `python -m engine sweep show {sweep_dir.name}`)."), sweep_dir.name


def on_start(ctx: AppContext, preset, field1, values1, field2, values2, overrides):
    text, sweep_id = start(ctx, preset, field1, values1, field2, values2, overrides)
    return text, sweep_choices(ctx, sweep_id)


def stop(ctx: AppContext, sweep_id: str | None) -> str:
    from engine.sweeps import resolve_sweep, stop_sweep

    if not sweep_id:
        return "Choose a sweep first."
    try:
        return html.escape(stop_sweep(resolve_sweep(sweeps_dir(ctx), sweep_id), ctx.runs_dir, jobs=ctx.jobs))
    except LoraLabError as error:
        return f"**Not stopped:** {html.escape(str(error))}"


def sweep_choices(ctx: AppContext, selected: str | None = None):
    import gradio as gr

    from engine.sweeps import list_sweeps

    names = list_sweeps(sweeps_dir(ctx))
    return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))


def view(ctx: AppContext, sweep_id: str | None) -> tuple:
    """(header, table rows, loss figure, Pareto vs memory, Pareto vs wall time, recommendation) of a sweep."""
    from engine.sweeps import pareto_front, read_results, read_sweep, recommendation, resolve_sweep
    from engine.sweeps.runner import sweep_states
    from engine.sweeps.store import sweep_state

    empty = charts.empty_figure("No sweep chosen")
    if not sweep_id:
        return "No sweep yet: choose a preset, a field and its values above.", [], empty, empty, empty, ""
    try:
        sweep = read_sweep(resolve_sweep(sweeps_dir(ctx), sweep_id))
    except LoraLabError as error:
        return f"**{html.escape(str(error))}**", [], empty, empty, empty, ""
    results = read_results(sweep, ctx.runs_dir)
    state = sweep_state(sweep, sweep_states(sweep, ctx.runs_dir))
    varied = "; ".join(f"{v['field']} = {', '.join(v['values'])}" for v in sweep.get("vary", []))
    header = (f"**{html.escape(sweep.get('id', sweep_id))}** ({state}): {html.escape(str(sweep.get('preset')))}, "
              f"{html.escape(varied)}")
    figures = []
    for cost, title, scale in (("peak_memory_bytes", "peak memory (MiB)", 2**20), ("wall_time_s", "wall time (s)", 1)):
        front = {r.name for r in pareto_front(results, cost)}
        points = [{"label": r.label, "quality": r.final_eval_loss, "front": r.name in front,
                   "cost": None if getattr(r, cost) is None else getattr(r, cost) / scale} for r in results]
        figures.append(charts.pareto_figure(points, title, uirevision=f"pareto-{cost}-{sweep_id}"))
    curves = {r.label: r.metrics for r in results}
    return (header, [list(r.row().values()) for r in results],
            charts.sweep_loss_figure(curves, uirevision=f"sweep-loss-{sweep_id}"), *figures,
            recommendation(results))


def build(ctx: AppContext) -> None:
    import gradio as gr

    from engine.sweeps import list_sweeps
    from engine.sweeps.summary import COLUMNS

    gr.Markdown("Start from a known-good preset and vary **one** field (or two, for a small grid); every value is an "
                f"ordinary run, queued one at a time. Examples: {EXAMPLES}.")
    presets = list_presets()
    with gr.Row():
        preset = gr.Dropdown(presets, value="demo-lora" if "demo-lora" in presets else (presets or [None])[0],
                             label="Preset", allow_custom_value=True)
        field1 = gr.Dropdown(FIELD_CHOICES, value="lora.r", label="Field to vary")
        values1 = gr.Textbox(value="2, 8, 32", label="Values (comma-separated; | when a value holds commas)")
    with gr.Row():
        field2 = gr.Dropdown([""] + FIELD_CHOICES, value="", label="Second field (optional, a grid)")
        values2 = gr.Textbox(value="", label="Its values")
    overrides = gr.Textbox(value="train.max_steps=40", lines=2,
                           label="--set for every run (one per line; a line for the varied field is ignored)")
    with gr.Row():
        if ctx.train_form:
            use_form = gr.Button("Use the Train tab's settings")
            use_form.click(from_train_form, ctx.train_form, [preset, overrides], api_name="sweep_from_train_form")
        preview_button = gr.Button("Preview runs")
        start_button = gr.Button("Start sweep", variant="primary")
    plan_text = gr.Markdown()
    plan_table = gr.Dataframe(headers=["lora.r"] + PLAN_COLUMNS_TAIL, interactive=False)
    gr.Markdown("#### Results")
    with gr.Row():
        known = list_sweeps(sweeps_dir(ctx))
        chosen = gr.Dropdown(label="Sweep", choices=known, value=known[0] if known else None, allow_custom_value=True,
                             scale=3)
        refresh_button = gr.Button("Refresh", size="sm", scale=1)
        stop_button = gr.Button("Stop sweep", variant="stop", size="sm", scale=1)
    message = gr.Markdown()
    header = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True)
    verdict = gr.Markdown(elem_id="loralab-sweep-recommendation")
    loss_plot = gr.Plot(label="Loss by value")
    with gr.Row():
        memory_plot = gr.Plot(label="Pareto: eval loss vs peak memory")
        time_plot = gr.Plot(label="Pareto: eval loss vs wall time")

    inputs = [preset, field1, values1, field2, values2, overrides]
    view_outputs = [header, table, loss_plot, memory_plot, time_plot, verdict]
    preview_button.click(on_preview, inputs, [plan_text, plan_table], api_name="sweep_preview")
    start_button.click(bind(on_start, ctx), inputs, [message, chosen], api_name="sweep_start").then(
        bind(view, ctx), chosen, view_outputs)
    stop_button.click(bind(stop, ctx), chosen, message, api_name="sweep_stop")
    refresh_button.click(bind(sweep_choices, ctx), chosen, chosen).then(bind(view, ctx), chosen, view_outputs)
    chosen.change(bind(view, ctx), chosen, view_outputs, api_name="sweep_view")
    timer = gr.Timer(5.0)
    timer.tick(bind(view, ctx), chosen, view_outputs, show_progress="hidden")
