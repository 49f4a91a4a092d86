"""Train tab: the run form, start/stop/resume, live charts, the runs table and comparison.

Layout and wiring only. Every value comes from and goes to the engine: the form maps
one-to-one onto ``RunConfig`` fields, the charts read the run directory through
``engine.training.rundir.RunWatcher``, and actions go through the ``JobManager``.
"""

from __future__ import annotations

import html
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from engine.chat.ratings import format_win_rate_cell
from engine.config import (
    METHODS,
    RunConfig,
    command_line,
    config_diff,
    field_spec,
    list_presets,
    load_preset,
)
from engine.config.build import boosters_line
from engine.config.gpus import gpus_line
from engine.config.overrides import render_value
from engine.errors import LoraLabError
from engine.training import rundir
from engine.training.trackers import read_destinations
from ui import charts, fields
from ui.context import AppContext

DEFAULT_PRESET = "demo-lora"
WATCH_LATEST = "(latest run)"
NO_RUN = "(no run)"  # the tick's key while there is no run to show

# The form's fields, grouped as the page shows them. What each field is (type, label, help,
# choices, range) comes from its RunConfig metadata (engine.config.field_spec), not from here.
FORM_GROUPS: dict[str, list[str]] = {
    "Model and data": ["model.name_or_path", "model.trust_remote_code", "data.path", "data.format", "data.eval_path",
                       "data.eval_fraction"],
    "LoRA": ["lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.target_modules"],
    "Training": ["train.learning_rate", "train.lr_scheduler_type", "train.optim", "train.num_train_epochs",
                 "train.max_steps", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
                 "train.max_length", "train.gradient_checkpointing", "train.bf16", "train.eval_steps", "train.seed",
                 "train.report_to"],
    "Boosters": ["model.attn_implementation", "train.padding_free", "train.packing", "train.packing_strategy",
                 "train.use_liger_kernel"],
    "Task metric": ["eval.metric", "eval.num_samples", "eval.max_new_tokens", "eval.schema_path", "eval.pattern"],
    "Early stopping": ["train.early_stopping_patience", "train.early_stopping_metric",
                       "train.early_stopping_direction"],
    "Multi-GPU": ["distributed.strategy", "distributed.num_processes", "distributed.gpu_ids",
                  "distributed.num_machines", "distributed.main_process_ip", "distributed.main_process_port",
                  "distributed.fsdp_sharding_strategy", "distributed.fsdp_auto_wrap_policy",
                  "distributed.fsdp_offload_params", "distributed.fsdp_cpu_ram_efficient_loading",
                  "quant.bnb_4bit_quant_storage"],
}
BOOSTER_FIELDS = FORM_GROUPS["Boosters"]
FIELD_NAMES = [name for names in FORM_GROUPS.values() for name in names]


# ----------------------------------------------------------------------------- form <-> config
def component_for(path: str, value):
    """The input component a field's metadata asks for."""
    spec = field_spec(path)
    common = {"label": spec.label, "info": spec.help, "value": form_value(path, value)}
    if spec.kind == "bool":
        return gr.Checkbox(**common)
    if spec.kind == "list":  # several of the choices
        return gr.Dropdown(choices=list(spec.choices or ()), multiselect=True, **common)
    if spec.choices is not None:
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind in ("int", "float", "number"):
        return fields.Number(precision=0 if spec.kind == "int" else None, **common)
    return gr.Textbox(**common)


def form_value(path: str, value):
    """A config value as the form shows it (lists comma-separated, nothing as an empty box)."""
    if value is None:
        return ""
    if field_spec(path).kind in ("modules", "mapping"):
        return render_value(value)
    return value


def config_to_values(config: RunConfig) -> list:
    return [form_value(name, config.get(name)) for name in FIELD_NAMES]


def form_to_config(preset: str, method: str, *values) -> tuple[RunConfig | None, list[LoraLabError]]:
    """The form's values over the preset, read as the engine reads YAML; every problem is returned."""
    try:
        config = load_preset(preset or DEFAULT_PRESET)
        for name, value in zip(FIELD_NAMES, values):
            config.set_path(name, value)
        config.set_method(method)
    except LoraLabError as error:
        return None, [error]
    return config, config.errors()


def field_updates(errors: list[LoraLabError] | None) -> list:
    """One update per form field: the engine's message next to a wrong field, the help otherwise."""
    by_field: dict[str, str] = {}
    for error in errors or []:
        by_field.setdefault(getattr(error, "field", ""), str(error).split(": ", 1)[-1])
    updates = []
    for name in FIELD_NAMES:
        if name in by_field:
            updates.append(gr.update(info=f"⚠ {by_field[name]}", elem_classes=["loralab-invalid"]))
        else:
            updates.append(gr.update(info=field_spec(name).help, elem_classes=[]))
    return updates


def errors_markdown(errors: list[LoraLabError]) -> str:
    if not errors:
        return ""
    items = "\n".join(f"- **{html.escape(getattr(e, 'field', ''))}**: {html.escape(str(e).split(': ', 1)[-1])}"
                      for e in errors)
    return f"**Not started: fix these fields first.**\n{items}"


# ----------------------------------------------------------------------------- run monitor
class Monitor:
    """One per app, shared by every viewer: a RunWatcher per run and the figures built from it.

    Five viewers of one run used to parse, build and serialise the same four Plotly figures
    five times per change, on the cores the training run needs. Here each figure is built
    and serialised once per change of what it shows (metrics or memory samples) and handed
    to every viewer as the same ``PlotData``; the runs table is shared the same way. A
    background thread watches the runs viewers looked at in the last ``PREFETCH_FOR_S`` and
    builds the new figures as soon as a metrics line lands, so the build overlaps the viewers'
    wait for their next tick instead of adding to it. Thread-safe: Gradio calls the tick from
    many threads at once.
    """

    RUNS_TABLE_TTL_S = 2.0
    PREFETCH_EVERY_S = 0.1
    PREFETCH_FOR_S = 10.0

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.watchers: dict[Path, rundir.RunWatcher] = {}
        self.predicted: dict[Path, int | None] = {}
        self._lock = threading.Lock()
        self._figures: dict[tuple, PlotData] = {}  # (run, chart, version) -> serialised figure
        self._building: dict[tuple, threading.Lock] = {}
        self._table: tuple[float, list] | None = None
        self._viewed: dict[Path, float] = {}  # run -> when a viewer last asked for it
        self._prefetcher: threading.Thread | None = None

    def watcher(self, run_dir: Path) -> rundir.RunWatcher:
        with self._lock:
            watcher = self.watchers.get(run_dir)
            if watcher is None:
                watcher = self.watchers[run_dir] = rundir.RunWatcher(run_dir)
        watcher.refresh()  # thread-safe: concurrent viewers read each appended byte once
        return watcher

    def viewed(self, run_dir: Path) -> rundir.RunWatcher:
        """A viewer's tick: the run's watcher, refreshed, and the run kept warm by the prefetcher."""
        with self._lock:
            self._viewed[run_dir] = time.monotonic()
            if self._prefetcher is None:
                self._prefetcher = threading.Thread(target=self._prefetch, name="loralab-charts", daemon=True)
                self._prefetcher.start()
        return self.watcher(run_dir)

    def _prefetch(self) -> None:
        while True:
            time.sleep(self.PREFETCH_EVERY_S)
            with self._lock:
                now = time.monotonic()
                recent = [run for run, when in self._viewed.items() if now - when < self.PREFETCH_FOR_S]
            for run_dir in recent:
                try:
                    metrics, samples, metrics_version, samples_version = self.watcher(run_dir).snapshot()
                    if metrics:
                        self.metric_figures(run_dir, metrics, metrics_version)
                    if samples:
                        self.memory_figure(run_dir, samples, samples_version)
                except Exception:  # noqa: BLE001 - a figure that cannot be built now is built (and said) by the tick
                    continue

    def figure(self, run_dir: Path, chart: str, version: int, build) -> PlotData:
        """``build()`` serialised once per (run, chart, version); every other viewer gets the same object."""
        key = (run_dir, chart, version)
        with self._lock:
            found = self._figures.get(key)
            if found is not None:
                return found
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one viewer builds; the others wait for it instead of building it again
            with self._lock:
                found = self._figures.get(key)
            if found is None:
                found = PlotData(type="plotly", plot=build().to_json())
                with self._lock:
                    for old in [k for k in self._figures if k[:2] == key[:2] and k[2] < version]:
                        del self._figures[old]  # an older version of this chart
                    self._figures[key] = found
                    self._building.pop(key, None)
        return found

    def metric_figures(self, run_dir: Path, metrics: list[dict], version: int) -> tuple[PlotData, ...]:
        """Loss, learning rate and gradient norm, throughput: built once per metrics version."""
        revision = run_dir.name
        return (
            self.figure(run_dir, "loss", version, lambda: charts.loss_figure(metrics, uirevision=f"loss-{revision}")),
            self.figure(run_dir, "lr", version,
                        lambda: charts.lr_gradnorm_figure(metrics, uirevision=f"lr-{revision}")),
            self.figure(run_dir, "speed", version,
                        lambda: charts.throughput_figure(metrics, uirevision=f"speed-{revision}")),
        )

    def memory_figure(self, run_dir: Path, samples: list[dict], version: int) -> PlotData:
        return self.figure(run_dir, "memory", version, lambda: charts.memory_figure(
            samples, predicted_peak_bytes=self.predicted_peak(run_dir), uirevision=f"memory-{run_dir.name}"))

    def runs_table(self) -> list[list]:
        """The runs table, listed at most once per ``RUNS_TABLE_TTL_S`` however many viewers poll it."""
        with self._lock:
            cached = self._table
        if cached is not None and time.monotonic() - cached[0] < self.RUNS_TABLE_TTL_S:
            return cached[1]
        table = runs_table(self.ctx)
        with self._lock:
            self._table = (time.monotonic(), table)
        return table

    def predicted_peak(self, run_dir: Path) -> int | None:
        if run_dir not in self.predicted:
            try:
                from engine.memory import estimate_for_run_config

                # What NVML will show (CUDA context and allocator included), to match the chart it is drawn on.
                self.predicted[run_dir] = estimate_for_run_config(rundir.load_config(run_dir)).nvidia_smi_bytes
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


def status_html(run_dir: Path | None, ctx: AppContext, metrics: list[dict] | None = None,
                status: dict | None = None, notes: list[str] | None = None, alarm=None) -> str:
    """Status line, progress bar and notes; ``metrics`` (already read by a RunWatcher) and ``status``
    (already read this tick) avoid re-reading files; ``notes``: what is damaged in the folder (default: the
    status files' own notes); ``alarm``: the run's overfitting alarm (``RunSummary.overfit``), if raised."""
    if run_dir is None:
        return "<div class='loralab-status'>No runs yet. Pick a preset and press <b>Start</b>.</div>"
    if status is None:
        status = rundir.read_status(run_dir)
    if metrics is None:
        metrics = rundir.read_metrics(run_dir)
    state = status.get("state", "unknown")
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None and m.get("step", 0) > 0]
    baseline = status.get("baseline_eval_loss")
    task = [m for m in metrics if m.get("event") == "task_eval" and m.get("score") is not None]
    step, total = int(status.get("step") or 0), status.get("max_steps") or 0
    percent = 100 * step / total if total else 0
    started, ended = status.get("started_at"), status.get("ended_at")
    elapsed = (ended or time.time()) - started if started else None
    eta = status.get("eta_s") if state in rundir.ACTIVE_STATES else None
    parts = [
        f"<div class='loralab-status' id='loralab-status'><b>{html.escape(run_dir.name)}</b> — "
        f"<span id='loralab-state'>{STATE_WORDS.get(state, state)}</span>: "
        f"{html.escape(status.get('message', ''))}</div>",
        f"<div style='background:#e5e7eb;border-radius:4px;height:14px;margin:6px 0'>"
        f"<div style='background:#2563eb;width:{percent:.1f}%;height:14px;border-radius:4px'></div></div>",
        f"<div>step <b>{step}</b> / {total or '?'} · elapsed {format_duration(elapsed)} · ETA {format_duration(eta)}"
        + (f" · {status['processes']} processes (batch and tokens/s count all)" if (status.get("processes") or 1) > 1
           else "")
        + (f" · base eval loss {baseline:.4f}" if baseline else "")
        + (f" · eval loss {evals[-1]:.4f}" if evals else "")
        + (f" · {html.escape(str(task[-1].get('metric')))} {task[-1]['score']:.3f}"
           + (f" (base {task[0]['score']:.3f})" if task[0].get("step") == 0 and len(task) > 1 else "")
           if task else "") + "</div>",
    ]
    for sentence in status.get("fallbacks", []):
        parts.append(f"<div>• {html.escape(sentence)}</div>")
    if alarm is not None:
        parts.append(f"<div class='loralab-error' id='loralab-overfit'>⚠ {html.escape(alarm.sentence)}</div>")
    notes = status.get("notes", []) if notes is None else notes
    for note in notes:  # a damaged entry in the run folder, said instead of failing
        parts.append(f"<div class='loralab-error'>⚠ {html.escape(note)}</div>")
    for item in read_destinations(run_dir):
        parts.append(f"<div class='loralab-tracker'>• {html.escape(str(item.get('label')))}: "
                     f"{html.escape(str(item.get('where')))} — open with <code>{html.escape(str(item.get('open')))}"
                     "</code></div>")
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
        row["win rate"] = win_rate_cell(summary.path)
        rows.append(list(row.values()))
    return rows


# note: what is damaged, if anything; overfitting: engine.training.overfit's alarm (from step N, best step M)
RUN_COLUMNS = ["name", "method", "base model", "status", "steps", "train loss", "eval loss", "task score",
               "peak memory (MiB)", "duration (s)", "overfitting", "created", "note", "win rate"]


def win_rate_cell(run_dir: Path) -> str:
    try:
        return format_win_rate_cell(run_dir)
    except Exception:  # noqa: BLE001 - a bad ratings file must not break the table
        return "?"


def run_names(ctx: AppContext) -> list[str]:
    return [WATCH_LATEST] + [s.name for s in rundir.list_runs(ctx.runs_dir)]


# ----------------------------------------------------------------------------- handlers (module level; tests call them)
def on_preset(name: str) -> list:
    """The preset's values into the form, its method into the radio."""
    try:
        config = load_preset(name)
    except LoraLabError as error:
        return [gr.update()] * (len(FIELD_NAMES) + 1) + [f"**Preset not loaded:** {html.escape(str(error))}"]
    return config_to_values(config) + [config.method, ""]


def boosters_markdown(preset: str, method: str, *values) -> str:
    """The one-line summary under Start: which boosters the form asks for (the run's log says what ran)."""
    config, errors = form_to_config(preset, method, *values)
    if config is None:
        return "Boosters: fix the form to see them."
    return boosters_line(config)


def on_upload(ctx: AppContext, path: str | None):
    """Copy an uploaded dataset into the runs folder (uploads are temporary) and put its path in the form."""
    if not path:
        return gr.update()
    source = Path(path)
    if source.stat().st_size > ctx.max_upload_mb * 2**20:
        return gr.update()
    uploads = ctx.runs_dir / ".uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    target = uploads / f"{time.strftime('%Y%m%d-%H%M%S')}-{source.name}"
    shutil.copyfile(source, target)
    return str(target)


def on_show_command(preset: str, method: str, *values, runs_dir: Path | None = None) -> list:
    config, errors = form_to_config(preset, method, *values)
    if config is None or errors:
        return field_updates(errors) + [errors_markdown(errors), gr.update(), gr.update(), gr.update()]
    command = command_line(preset or DEFAULT_PRESET, config) + launch_commands_text(config, runs_dir)
    return field_updates([]) + ["", command, config.to_yaml(), gr.update(open=True)]


def launch_commands_text(config: RunConfig, runs_dir: Path | None) -> str:
    """A multi-GPU run's accelerate launch command for each machine, as the run will write them (accelerate/)."""
    if config.distributed.strategy == "none":
        return ""
    from engine import PROJECT_ROOT
    from engine.config.build import launch_commands

    run_dir = Path(runs_dir or "runs") / (config.name or "RUN_NAME")
    machines = config.distributed.num_machines
    lines = ["", "", f"# {config.distributed.strategy}: {config.distributed.world_size} processes on {machines} "
             f"machine{'s' if machines != 1 else ''}, launched by accelerate. The run writes its accelerate config "
             "and these commands", f"# into {run_dir}/accelerate/ (the dashboard runs machine 0's itself; every "
             "machine needs this project, the model, the data and the run folder at the same paths)."]
    for rank, command in enumerate(launch_commands(config, run_dir, PROJECT_ROOT)):
        lines += [f"# machine {rank}", command]
    return "\n".join(lines)


def on_start(ctx: AppContext, preset: str, method: str, *values) -> list:
    config, errors = form_to_config(preset, method, *values)
    if config is None or errors:
        return field_updates(errors) + [errors_markdown(errors), gr.update(), gr.update()]
    try:
        run_dir = ctx.jobs.submit(config)
    except LoraLabError as error:
        return field_updates([error]) + [errors_markdown([error]), gr.update(), gr.update()]
    queued = ctx.jobs.active_name() != run_dir.name
    note = f"Queued **{run_dir.name}** behind the running job." if queued else f"Started **{run_dir.name}**."
    return field_updates([]) + [note, gr.update(choices=run_names(ctx), value=run_dir.name), runs_table(ctx)]


def on_stop(ctx: AppContext, choice: str | None) -> str:
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


def on_resume(ctx: AppContext, choice: str | None) -> str:
    run_dir = resolve_watched(ctx, choice)
    if run_dir is None:
        return "No run to resume."
    try:
        ctx.jobs.resume(run_dir.name)
    except LoraLabError as error:
        return str(error)
    return f"Resuming **{run_dir.name}** from its last checkpoint."


def on_tick(ctx: AppContext, monitor: Monitor, choice: str | None, last_key: str):
    """Status every tick; charts only when the run or its files changed (bounded payloads, built
    once for all viewers)."""
    if choice and choice != WATCH_LATEST:
        try:
            rundir.resolve_run(ctx.runs_dir, choice)
        except LoraLabError as error:  # not a run name, gone, or unreadable: say which, in words
            return (f"<div class='loralab-error' id='loralab-error'>{html.escape(str(error))}</div>", gr.skip(),
                    gr.skip(), gr.skip(), gr.skip(), gr.skip(), last_key)
    run_dir = resolve_watched(ctx, choice)
    if run_dir is None:
        samples = ctx.sampler.recent(300) if ctx.sampler else []
        # The page is served with empty plots (building Plotly figures costs a second at start-up);
        # the first tick says why they are empty.
        blank = last_key != NO_RUN
        empty = (lambda name: charts.empty_figure("No metrics yet", name)) if blank else (lambda name: gr.skip())
        return (status_html(None, ctx), empty("loss"), charts.memory_figure(samples), empty("lr-gradnorm"),
                empty("throughput"), gr.skip(), NO_RUN)
    metrics, samples, metrics_version, samples_version = monitor.viewed(run_dir).snapshot()
    key = f"{run_dir.name}:{metrics_version}:{samples_version}"
    status = rundir.read_status(run_dir)
    # Damage anywhere in the folder (config, metrics, samples), from the runs table's cached facts.
    summary = rundir.cached_summary(run_dir)
    status_text = status_html(run_dir, ctx, metrics, status, summary.notes, summary.overfit)
    active = status.get("state") in rundir.ACTIVE_STATES
    # A finished run without samples of its own shows the live device memory instead.
    live = not samples and not active and ctx.sampler is not None
    if live:
        samples = ctx.sampler.recent(300)
    if key == last_key:
        memory = charts.memory_figure(samples, uirevision=f"memory-{run_dir.name}") if live else gr.skip()
        return status_text, gr.skip(), memory, gr.skip(), gr.skip(), gr.skip(), key
    # What this viewer already has is not sent again: a new memory sample leaves the loss charts as they are.
    seen_run, _, seen = (last_key or "").partition(":")
    seen_metrics, _, seen_samples = seen.partition(":") if seen_run == run_dir.name else ("", "", "")
    metrics_new, samples_new = seen_metrics != str(metrics_version), seen_samples != str(samples_version)
    if live:
        memory = charts.memory_figure(samples, predicted_peak_bytes=monitor.predicted_peak(run_dir),
                                      uirevision=f"memory-{run_dir.name}")
    elif samples_new:
        memory = monitor.memory_figure(run_dir, samples, samples_version)
    else:
        memory = gr.skip()
    if not metrics_new:
        return status_text, gr.skip(), memory, gr.skip(), gr.skip(), gr.skip(), key
    loss, lr, speed = monitor.metric_figures(run_dir, metrics, metrics_version)
    return status_text, loss, memory, lr, speed, rundir.log_tail(run_dir, 60), key


def on_refresh_runs(ctx: AppContext):
    names = run_names(ctx)
    return runs_table(ctx), gr.update(choices=names), gr.update(choices=names[1:])


def on_compare(ctx: AppContext, names: list[str] | None):
    """Loss and memory of the chosen runs overlaid, and their configs side by side (differences first)."""
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
    headers, rows = config_diff({d.name: _config_or_none(d) for d in run_dirs})
    return (charts.loss_figure(metrics, uirevision="compare-loss"),
            charts.memory_figure(None, runs=samples, uirevision="compare-memory"),
            gr.update(value=rows, headers=headers))


def _config_or_none(run_dir: Path) -> RunConfig | None:
    try:
        return rundir.load_config(run_dir)
    except LoraLabError:
        return None


# ----------------------------------------------------------------------------- layout
def build(ctx: AppContext) -> None:
    monitor = Monitor(ctx)
    initial = load_preset(DEFAULT_PRESET)

    with gr.Row():
        with gr.Column(scale=2, min_width=380):
            with gr.Row():
                preset = gr.Dropdown(list_presets(), value=DEFAULT_PRESET, label="Preset", scale=3)
                method = gr.Radio(list(METHODS), value=initial.method, label="Method", scale=3)
            with gr.Row():
                show_command = gr.Button("Show command")
                start = gr.Button("Start", variant="primary", elem_id="loralab-start")
            booster_note = gr.Markdown(boosters_line(initial), elem_id="loralab-boosters")
            form_errors = gr.Markdown(elem_id="loralab-form-errors")
            components = {}
            for group, names in FORM_GROUPS.items():
                with gr.Accordion(group, open=group not in ("Training", "Boosters", "Task metric", "Multi-GPU")):
                    for name in names:
                        components[name] = component_for(name, initial.get(name))
                    if group == "Multi-GPU":
                        gr.Markdown(gpus_line(), elem_id="loralab-gpus")
                    if group == "Model and data":
                        upload = gr.File(label=f"Upload a dataset (JSONL, JSON, CSV, Parquet; up to "
                                               f"{ctx.max_upload_mb} MB)",
                                         file_types=[".jsonl", ".json", ".csv", ".parquet"], type="filepath")
            form = [components[name] for name in FIELD_NAMES]
            with gr.Accordion("Command and resolved YAML", open=False) as command_box:
                command = gr.Code(language="shell", label="Headless equivalent", interactive=False)
                resolved_yaml = gr.Code(language="yaml", label="Resolved config.yaml", interactive=False)

        with gr.Column(scale=3):
            with gr.Row():
                watched = gr.Dropdown(run_names(ctx), value=WATCH_LATEST, label="Run", scale=4,
                                      allow_custom_value=True)
                stop = gr.Button("Stop", scale=1, elem_id="loralab-stop")
                resume = gr.Button("Resume", scale=1)
            status = gr.HTML(status_html(resolve_watched(ctx, WATCH_LATEST), ctx), elem_id="loralab-status-box")
            action_note = gr.Markdown()
            # Served empty: the first timer tick (0.5 s) fills them, so start-up builds no Plotly figure.
            with gr.Row():
                loss_plot = gr.Plot(label="Loss", elem_id="loralab-loss")
                memory_plot = gr.Plot(label="Memory")
            with gr.Row():
                lr_plot = gr.Plot(label="Learning rate and gradient norm")
                speed_plot = gr.Plot(label="Tokens per second")
            with gr.Accordion("Log (tail)", open=False):
                log_box = gr.Code(language=None, label="train.log", interactive=False)

    with gr.Accordion("Runs", open=True):
        table = gr.Dataframe(headers=RUN_COLUMNS, value=runs_table(ctx), interactive=False, wrap=True,
                             elem_id="loralab-runs-table")
        with gr.Row():
            compare_pick = gr.Dropdown(run_names(ctx)[1:], multiselect=True, label="Compare runs", scale=4)
            refresh_runs = gr.Button("Refresh", scale=1)
        with gr.Row():
            compare_loss = gr.Plot(label="Loss, overlaid")
            compare_memory = gr.Plot(label="Memory, overlaid")
        compare_configs = gr.Dataframe(label="Configs side by side (≠ marks fields that differ)", interactive=False)

    # ------------------------------------------------------------------ wiring
    preset.change(on_preset, [preset], form + [method, form_errors], api_name="load_preset")
    for name in BOOSTER_FIELDS:
        components[name].change(boosters_markdown, [preset, method] + form, [booster_note], show_progress="hidden",
                                queue=False)
    upload.upload(partial(on_upload, ctx), [upload], [components["data.path"]])
    show_command.click(partial(on_show_command, runs_dir=ctx.runs_dir), [preset, method] + form,
                       form + [form_errors, command, resolved_yaml, command_box], api_name="show_command")
    start.click(partial(on_start, ctx), [preset, method] + form, form + [form_errors, watched, table],
                api_name="start")
    stop.click(partial(on_stop, ctx), [watched], [action_note], api_name="stop")
    resume.click(partial(on_resume, ctx), [watched], [action_note], api_name="resume")

    last_key = gr.State("")
    tick_outputs = [status, loss_plot, memory_plot, lr_plot, speed_plot, log_box, last_key]
    timer = gr.Timer(0.5)  # p95 metric-to-chart latency must stay under 1 s (bench/ui_latency.py)
    timer.tick(partial(on_tick, ctx, monitor), [watched, last_key], tick_outputs, show_progress="hidden",
               api_name="tick", queue=False)
    watched.change(partial(on_tick, ctx, monitor), [watched, gr.State("")], tick_outputs, api_name="watch",
                   queue=False)
    refresh_runs.click(partial(on_refresh_runs, ctx), None, [table, watched, compare_pick], api_name="refresh_runs",
                       queue=False)
    slow_timer = gr.Timer(5.0)
    slow_timer.tick(monitor.runs_table, None, [table], show_progress="hidden", queue=False)
    compare_pick.change(partial(on_compare, ctx), [compare_pick], [compare_loss, compare_memory, compare_configs],
                        api_name="compare")
    ctx.train_form = [preset, method] + form
