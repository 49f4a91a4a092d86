"""Train tab: the run form, start/stop/resume, live charts, the runs table and comparison.

Layout and wiring only. Every value comes from and goes to the engine: the form maps
one-to-one onto ``RunConfig`` fields, the charts read the run directory through
``engine.training.rundir.RunWatcher``, and actions go through the ``JobManager``.
"""

from __future__ import annotations

import html
import shlex
import shutil
import time
from pathlib import Path

import gradio as gr

from engine.training import rundir
from engine.config import METHODS, OPTIMIZERS, SCHEDULERS, RunConfig, field_help, list_presets, load_preset
from engine.errors import LoraLabError
from ui import charts
from ui.context import AppContext

DEFAULT_PRESET = "demo-lora"
WATCH_LATEST = "(latest run)"

# (dotted RunConfig field, component factory): the order here is the order of the form.
FORM_FIELDS: list[tuple[str, callable]] = [
    ("model.name_or_path", lambda h, v: gr.Textbox(value=v, label="Base model", info=h)),
    ("model.trust_remote_code", lambda h, v: gr.Checkbox(value=v, label="Trust remote code", info=h)),
    ("data.path", lambda h, v: gr.Textbox(value=v, label="Dataset", info=h)),
    ("data.format", lambda h, v: gr.Dropdown(value=v, choices=["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"],
                                          label="Dataset format", info=h)),
    ("data.eval_path", lambda h, v: gr.Textbox(value=v, label="Eval file (optional)", info=h)),
    ("data.eval_fraction", lambda h, v: gr.Number(value=v, label="Eval fraction", info=h)),
    ("lora.r", lambda h, v: gr.Number(value=v, label="Rank r", precision=0, info=h)),
    ("lora.lora_alpha", lambda h, v: gr.Number(value=v, label="Alpha", info=h)),
    ("lora.lora_dropout", lambda h, v: gr.Number(value=v, label="Dropout", info=h)),
    ("lora.target_modules", lambda h, v: gr.Textbox(value=v, label="Target modules", info=h)),
    ("train.learning_rate", lambda h, v: gr.Number(value=v, label="Learning rate", info=h)),
    ("train.lr_scheduler_type", lambda h, v: gr.Dropdown(value=v, choices=list(SCHEDULERS), label="Schedule", info=h)),
    ("train.optim", lambda h, v: gr.Dropdown(value=v, choices=list(OPTIMIZERS), label="Optimizer", info=h)),
    ("train.num_train_epochs", lambda h, v: gr.Number(value=v, label="Epochs", info=h)),
    ("train.max_steps", lambda h, v: gr.Number(value=v, label="Max steps", precision=0, info=h)),
    ("train.per_device_train_batch_size", lambda h, v: gr.Number(value=v, label="Batch size", precision=0, info=h)),
    ("train.gradient_accumulation_steps", lambda h, v: gr.Number(value=v, label="Gradient accumulation", precision=0, info=h)),
    ("train.max_length", lambda h, v: gr.Number(value=v, label="Max length (tokens)", precision=0, info=h)),
    ("train.packing", lambda h, v: gr.Checkbox(value=v, label="Packing", info=h)),
    ("train.gradient_checkpointing", lambda h, v: gr.Checkbox(value=v, label="Gradient checkpointing", info=h)),
    ("train.bf16", lambda h, v: gr.Checkbox(value=v, label="bf16", info=h)),
    ("train.eval_steps", lambda h, v: gr.Number(value=v, label="Eval every N steps", precision=0, info=h)),
    ("train.seed", lambda h, v: gr.Number(value=v, label="Seed", precision=0, info=h)),
]
FIELD_NAMES = [name for name, _ in FORM_FIELDS]
INT_FIELDS = {"lora.r", "train.max_steps", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
              "train.max_length", "train.eval_steps", "train.seed"}


# ----------------------------------------------------------------------------- form <-> config
def _get(config: RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def config_to_values(config: RunConfig) -> list:
    values = []
    for name in FIELD_NAMES:
        value = _get(config, name)
        if name == "lora.target_modules" and isinstance(value, list):
            value = ", ".join(value)
        values.append("" if value is None and name.endswith(("eval_path",)) else value)
    return values


def values_to_config(preset: str, method: str, values: list) -> RunConfig:
    """The form's values applied over the preset, as the engine would read them from YAML."""
    config = load_preset(preset or DEFAULT_PRESET)
    for name, value in zip(FIELD_NAMES, values):
        if isinstance(value, str):
            value = value.strip()
        if name == "data.eval_path" and not value:
            value = None
        if name in INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        config.set_path(name, value)
    config.set_method(method)
    return config


def command_line(preset: str, config: RunConfig) -> str:
    """The headless equivalent: the preset plus a --set for every field the form changed."""
    base = load_preset(preset or DEFAULT_PRESET).to_dict()
    current = config.to_dict()
    overrides = []
    for section, fields in current.items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                if base.get(section, {}).get(key) != value:
                    rendered = ",".join(value) if isinstance(value, list) else ("null" if value is None else value)
                    overrides.append(f"--set {section}.{key}={shlex.quote(str(rendered))}")
    preset_arg = f"presets/{preset}.yaml" if preset in list_presets() else shlex.quote(preset)
    return " \\\n  ".join([f"python -m engine train {preset_arg}"] + overrides)


def field_updates(errors: list[LoraLabError] | None) -> list:
    """One update per form field: the engine's message next to a wrong field, the help otherwise."""
    helps = field_help()
    by_field: dict[str, str] = {}
    for error in errors or []:
        by_field.setdefault(getattr(error, "field", ""), str(error).split(": ", 1)[-1])
    updates = []
    for name in FIELD_NAMES:
        if name in by_field:
            updates.append(gr.update(info=f"⚠ {by_field[name]}", elem_classes=["loralab-invalid"]))
        else:
            updates.append(gr.update(info=helps.get(name, ""), elem_classes=[]))
    return updates


def validate_form(preset, method, *values) -> tuple[RunConfig | None, list[LoraLabError]]:
    try:
        config = values_to_config(preset, method, list(values))
    except LoraLabError as error:
        return None, [error]
    return config, config.errors()


def errors_markdown(errors: list[LoraLabError]) -> str:
    if not errors:
        return ""
    items = "\n".join(f"- **{html.escape(getattr(e, 'field', ''))}**: {html.escape(str(e).split(': ', 1)[-1])}"
                      for e in errors)
    return f"**Not started: fix these fields first.**\n{items}"


# ----------------------------------------------------------------------------- run monitor
class Monitor:
    """Per-app cache of RunWatchers and predicted peaks (computed once per run, not per tick)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.watchers: dict[Path, rundir.RunWatcher] = {}
        self.predicted: dict[Path, int | None] = {}

    def watcher(self, run_dir: Path) -> rundir.RunWatcher:
        if run_dir not in self.watchers:
            self.watchers[run_dir] = rundir.RunWatcher(run_dir)
        watcher = self.watchers[run_dir]
        watcher.refresh()
        return watcher

    def predicted_peak(self, run_dir: Path) -> int | None:
        if run_dir not in self.predicted:
            try:
                from engine.memory.estimator import estimate_for_run_config
                import yaml

                config = yaml.safe_load(rundir.RunPaths(run_dir).config.read_text())
                # What NVML will show (CUDA context and allocator included), to match the chart it is drawn on.
                self.predicted[run_dir] = estimate_for_run_config(config).nvidia_smi_bytes
            except Exception:  # noqa: BLE001 - a missing prediction must never break the chart
                self.predicted[run_dir] = None
        return self.predicted[run_dir]


def resolve_watched(ctx: AppContext, choice: str | None) -> Path | None:
    if choice and choice != WATCH_LATEST:
        try:
            return rundir.resolve_run(ctx.runs_dir, choice)
        except LoraLabError:
            return None
    active = ctx.jobs.active_name() if ctx.jobs else None
    if active:
        return ctx.runs_dir / active
    listed = rundir.list_runs(ctx.runs_dir)
    return listed[0].path if listed else None


def format_duration(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


STATE_WORDS = {
    "queued": "Queued", "loading": "Loading", "training": "Training", "evaluating": "Evaluating",
    "saving": "Saving", "completed": "Completed", "stopped": "Stopped", "failed": "Failed",
    "interrupted": "Interrupted",
}


def status_html(run_dir: Path | None, ctx: AppContext, metrics: list[dict] | None = None) -> str:
    """Status line, progress bar and notes; ``metrics`` (already read by a RunWatcher) avoids re-reading files."""
    if run_dir is None:
        return "<div class='loralab-status'>No runs yet. Pick a preset and press <b>Start</b>.</div>"
    status = rundir.read_status(run_dir)
    if metrics is None:
        metrics = rundir.read_metrics(run_dir)
    state = status.get("state", "unknown")
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None and m.get("step", 0) > 0]
    baseline = status.get("baseline_eval_loss")
    step, total = int(status.get("step") or 0), status.get("max_steps") or 0
    percent = 100 * step / total if total else 0
    elapsed = (status.get("ended_at") or time.time()) - status["started_at"] if status.get("started_at") else None
    eta = status.get("eta_s") if state in rundir.ACTIVE_STATES else None
    parts = [
        f"<div class='loralab-status' id='loralab-status'><b>{html.escape(run_dir.name)}</b> — "
        f"<span id='loralab-state'>{STATE_WORDS.get(state, state)}</span>: "
        f"{html.escape(status.get('message', ''))}</div>",
        f"<div style='background:#e5e7eb;border-radius:4px;height:14px;margin:6px 0'>"
        f"<div style='background:#2563eb;width:{percent:.1f}%;height:14px;border-radius:4px'></div></div>",
        f"<div>step <b>{step}</b> / {total or '?'} · elapsed {format_duration(elapsed)} · ETA {format_duration(eta)}"
        + (f" · base eval loss {baseline:.4f}" if baseline else "")
        + (f" · eval loss {evals[-1]:.4f}" if evals else "") + "</div>",
    ]
    for sentence in status.get("fallbacks", []):
        parts.append(f"<div>• {html.escape(sentence)}</div>")
    if status.get("error"):
        parts.append(f"<div class='loralab-error' id='loralab-error'><b>Why it failed:</b> "
                     f"{html.escape(status['error'])}</div>")
    if ctx.sampler is not None:
        parts.append(f"<div>• {html.escape(ctx.sampler.status_text())}</div>")
    queue = ctx.jobs.queue_names() if ctx.jobs else []
    if queue:
        parts.append(f"<div>Queue: {html.escape(', '.join(queue))}</div>")
    return "\n".join(parts)


def runs_table(ctx: AppContext) -> list[list]:
    rows = []
    for summary in rundir.list_runs(ctx.runs_dir):
        row = summary.as_row()
        row["win rate"] = _win_rate_text(summary.path)
        rows.append(list(row.values()))
    return rows


RUN_COLUMNS = ["name", "method", "base model", "status", "steps", "train loss", "eval loss", "peak memory (MiB)",
               "duration (s)", "created", "win rate"]


def _win_rate_text(run_dir: Path) -> str:
    try:
        from engine.chat.models import win_rate

        rate, wins, count = win_rate(run_dir)
    except (ImportError, AttributeError):
        return ""
    except Exception:  # noqa: BLE001 - a bad ratings file must not break the table
        return "?"
    return "" if not count or rate is None else f"{100 * rate:.0f}% of {count}"


def config_diff(run_dirs: list[Path]) -> tuple[list[str], list[list]]:
    """Side-by-side configs; rows whose values differ come first and are marked."""
    flat = []
    for run_dir in run_dirs:
        try:
            config = rundir.load_config(run_dir).to_dict()
        except LoraLabError:
            config = {}
        row = {}
        for section, fields in config.items():
            if isinstance(fields, dict):
                row.update({f"{section}.{k}": v for k, v in fields.items()})
        flat.append(row)
    keys = sorted({k for row in flat for k in row})
    differing = [k for k in keys if len({repr(row.get(k)) for row in flat}) > 1]
    same = [k for k in keys if k not in differing]
    headers = ["field"] + [d.name for d in run_dirs]
    table = [[f"≠ {k}"] + [str(row.get(k)) for row in flat] for k in differing]
    table += [[k] + [str(row.get(k)) for row in flat] for k in same]
    return headers, table


# ----------------------------------------------------------------------------- layout
def build(ctx: AppContext) -> None:
    monitor = Monitor(ctx)
    helps = field_help()
    initial = load_preset(DEFAULT_PRESET)
    run_names = lambda: [WATCH_LATEST] + [s.name for s in rundir.list_runs(ctx.runs_dir)]

    with gr.Row():
        with gr.Column(scale=2, min_width=380):
            with gr.Row():
                preset = gr.Dropdown(list_presets(), value=DEFAULT_PRESET, label="Preset", scale=3)
                method = gr.Radio(list(METHODS), value=initial.method, label="Method", scale=3)
            with gr.Row():
                show_command = gr.Button("Show command")
                start = gr.Button("Start", variant="primary", elem_id="loralab-start")
            form_errors = gr.Markdown(elem_id="loralab-form-errors")
            components = {}
            initial_values = dict(zip(FIELD_NAMES, config_to_values(initial)))
            with gr.Accordion("Model and data", open=True):
                for name, factory in FORM_FIELDS[:6]:
                    components[name] = factory(helps.get(name, ""), initial_values[name])
                upload = gr.File(label=f"Upload a dataset (JSONL, JSON, CSV, Parquet; up to {ctx.max_upload_mb} MB)",
                                 file_types=[".jsonl", ".json", ".csv", ".parquet"], type="filepath")
            with gr.Accordion("LoRA", open=True):
                for name, factory in FORM_FIELDS[6:10]:
                    components[name] = factory(helps.get(name, ""), initial_values[name])
            with gr.Accordion("Training", open=False):
                for name, factory in FORM_FIELDS[10:]:
                    components[name] = factory(helps.get(name, ""), initial_values[name])
            form = [components[name] for name in FIELD_NAMES]
            with gr.Accordion("Command and resolved YAML", open=False) as command_box:
                command = gr.Code(language="shell", label="Headless equivalent", interactive=False)
                resolved_yaml = gr.Code(language="yaml", label="Resolved config.yaml", interactive=False)

        with gr.Column(scale=3):
            with gr.Row():
                watched = gr.Dropdown(run_names(), value=WATCH_LATEST, label="Run", scale=4, allow_custom_value=True)
                stop = gr.Button("Stop", scale=1, elem_id="loralab-stop")
                resume = gr.Button("Resume", scale=1)
            status = gr.HTML(status_html(resolve_watched(ctx, WATCH_LATEST), ctx), elem_id="loralab-status-box")
            action_note = gr.Markdown()
            with gr.Row():
                loss_plot = gr.Plot(charts.empty_figure("No metrics yet", "loss"), label="Loss", elem_id="loralab-loss")
                memory_plot = gr.Plot(charts.empty_figure("No memory samples yet", "memory"), label="Memory")
            with gr.Row():
                lr_plot = gr.Plot(charts.empty_figure("No metrics yet", "lr-gradnorm"), label="Learning rate and gradient norm")
                speed_plot = gr.Plot(charts.empty_figure("No metrics yet", "throughput"), label="Tokens per second")
            with gr.Accordion("Log (tail)", open=False):
                log_box = gr.Code(language=None, label="train.log", interactive=False)

    with gr.Accordion("Runs", open=True):
        table = gr.Dataframe(headers=RUN_COLUMNS, value=runs_table(ctx), interactive=False, wrap=True,
                             elem_id="loralab-runs-table")
        with gr.Row():
            compare_pick = gr.Dropdown(run_names()[1:], multiselect=True, label="Compare runs", scale=4)
            refresh_runs = gr.Button("Refresh", scale=1)
        with gr.Row():
            compare_loss = gr.Plot(label="Loss, overlaid")
            compare_memory = gr.Plot(label="Memory, overlaid")
        compare_configs = gr.Dataframe(label="Configs side by side (≠ marks fields that differ)", interactive=False)

    # ------------------------------------------------------------------ handlers
    def on_preset(name):
        try:
            config = load_preset(name)
        except LoraLabError as error:
            return [gr.update()] * (len(form) + 1) + [f"**Preset not loaded:** {error}"]
        return config_to_values(config) + [config.method, ""]

    preset.change(on_preset, [preset], form + [method, form_errors], api_name="load_preset")

    def on_upload(path):
        if not path:
            return gr.update()
        source = Path(path)
        if source.stat().st_size > ctx.max_upload_mb * 2**20:
            return gr.update()
        uploads = ctx.uploads_dir or (ctx.runs_dir / ".uploads")
        uploads.mkdir(parents=True, exist_ok=True)
        target = uploads / f"{time.strftime('%Y%m%d-%H%M%S')}-{source.name}"
        shutil.copyfile(source, target)
        return str(target)

    upload.upload(on_upload, [upload], [components["data.path"]])

    def on_show_command(preset_name, method_name, *values):
        config, errors = validate_form(preset_name, method_name, *values)
        if config is None or errors:
            return field_updates(errors) + [errors_markdown(errors), gr.update(), gr.update(), gr.update()]
        return field_updates([]) + ["", command_line(preset_name, config), config.to_yaml(), gr.update(open=True)]

    show_command.click(on_show_command, [preset, method] + form,
                       form + [form_errors, command, resolved_yaml, command_box], api_name="show_command")

    def on_start(preset_name, method_name, *values):
        config, errors = validate_form(preset_name, method_name, *values)
        if config is None or errors:
            return field_updates(errors) + [errors_markdown(errors), gr.update(), gr.update()]
        try:
            run_dir = ctx.jobs.submit(config)
        except LoraLabError as error:
            return field_updates([error]) + [errors_markdown([error]), gr.update(), gr.update()]
        queued = ctx.jobs.active_name() != run_dir.name
        note = f"Queued **{run_dir.name}** behind the running job." if queued else f"Started **{run_dir.name}**."
        return field_updates([]) + [note, gr.update(choices=run_names(), value=run_dir.name), runs_table(ctx)]

    start.click(on_start, [preset, method] + form, form + [form_errors, watched, table], api_name="start")

    def on_stop(choice):
        run_dir = resolve_watched(ctx, choice)
        if run_dir is None:
            return "No run to stop."
        try:
            outcome = ctx.jobs.stop(run_dir.name)
        except LoraLabError as error:
            return str(error)
        return {"requested": f"Stopping **{run_dir.name}**: it finishes the current step, saves, then exits. "
                             "Press Stop again to kill it now.",
                "killed": f"**{run_dir.name}** was killed.",
                "dequeued": f"**{run_dir.name}** was removed from the queue."}[outcome]

    stop.click(on_stop, [watched], [action_note], api_name="stop")

    def on_resume(choice):
        run_dir = resolve_watched(ctx, choice)
        if run_dir is None:
            return "No run to resume."
        try:
            ctx.jobs.resume(run_dir.name)
        except LoraLabError as error:
            return str(error)
        return f"Resuming **{run_dir.name}** from its last checkpoint."

    resume.click(on_resume, [watched], [action_note], api_name="resume")

    def on_tick(choice, last_key):
        """Status every tick; charts only when the run or its files changed (bounded payloads)."""
        run_dir = resolve_watched(ctx, choice)
        if run_dir is None:
            samples = ctx.sampler.recent(300) if ctx.sampler else []
            return (status_html(None, ctx), gr.skip(), charts.memory_figure(samples), gr.skip(), gr.skip(),
                    gr.skip(), last_key)
        watcher = monitor.watcher(run_dir)
        key = f"{run_dir.name}:{len(watcher.metrics)}:{len(watcher.gpu_samples)}"
        status_text = status_html(run_dir, ctx, watcher.metrics)
        active = rundir.read_status(run_dir).get("state") in rundir.ACTIVE_STATES
        # A finished run without samples of its own shows the live device memory instead.
        live = not watcher.gpu_samples and not active and ctx.sampler is not None
        samples = ctx.sampler.recent(300) if live else watcher.gpu_samples
        if key == last_key:
            memory = charts.memory_figure(samples, uirevision=f"memory-{run_dir.name}") if live else gr.skip()
            return status_text, gr.skip(), memory, gr.skip(), gr.skip(), gr.skip(), key
        revision = run_dir.name
        return (
            status_text,
            charts.loss_figure(watcher.metrics, uirevision=f"loss-{revision}"),
            charts.memory_figure(samples, predicted_peak_bytes=monitor.predicted_peak(run_dir),
                                 uirevision=f"memory-{revision}"),
            charts.lr_gradnorm_figure(watcher.metrics, uirevision=f"lr-{revision}"),
            charts.throughput_figure(watcher.metrics, uirevision=f"speed-{revision}"),
            rundir.log_tail(run_dir, 60),
            key,
        )

    last_key = gr.State("")
    timer = gr.Timer(0.5)  # p95 metric-to-chart latency must stay under 1 s (bench/ui_latency.py)
    timer.tick(on_tick, [watched, last_key], [status, loss_plot, memory_plot, lr_plot, speed_plot, log_box, last_key],
               show_progress="hidden", api_name="tick", queue=False)
    watched.change(lambda c: on_tick(c, ""), [watched], [status, loss_plot, memory_plot, lr_plot, speed_plot,
                                                         log_box, last_key], api_name="watch")

    def on_refresh_runs():
        names = run_names()
        return runs_table(ctx), gr.update(choices=names), gr.update(choices=names[1:])

    refresh_runs.click(on_refresh_runs, None, [table, watched, compare_pick], api_name="refresh_runs")
    slow_timer = gr.Timer(5.0)
    slow_timer.tick(lambda: runs_table(ctx), None, [table], show_progress="hidden", queue=False)

    def on_compare(names):
        run_dirs = []
        for name in names or []:
            try:
                run_dirs.append(rundir.resolve_run(ctx.runs_dir, name))
            except LoraLabError:
                continue
        if not run_dirs:
            return charts.empty_figure("Pick runs to compare", "compare-loss"), \
                charts.empty_figure("Pick runs to compare", "compare-memory"), None
        metrics = {d.name: rundir.read_metrics(d) for d in run_dirs}
        samples = {d.name: rundir.read_gpu_samples(d) for d in run_dirs}
        headers, rows = config_diff(run_dirs)
        return (charts.loss_figure(metrics, uirevision="compare-loss"),
                charts.memory_figure(None, runs=samples, uirevision="compare-memory"),
                gr.update(value=rows, headers=headers))

    compare_pick.change(on_compare, [compare_pick], [compare_loss, compare_memory, compare_configs],
                        api_name="compare")

    ctx.train_form = [preset, method] + form
