"""The Memory tab: "will this fit, and why?" before a run, prediction against measurement after,
and full / LoRA / QLoRA measured side by side on this machine (``engine.measurements``).

Layout and wiring only; the numbers come from ``engine.memory.estimator``. The pure helpers below
(form -> settings, estimates -> figure / table / text, run directory -> comparison) are
what the tests call; ``build(ctx)`` only lays components out and connects them.
No torch import here: the estimator is arithmetic.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from engine.config.schema import FSDP_SHARDING
from engine.errors import LoraLabError
from engine.memory.arch import ModelArch, arch_from_numbers, catalog_ids, load_arch
from engine.memory.estimator import (
    GPUS,
    METHOD_LABELS,
    OPTIMIZERS,
    TERM_TITLES,
    MemoryEstimate,
    MemorySettings,
    estimate,
    fits_on_gpus,
    max_batch_or_seq_that_fits,
    per_gpu_label,
    settings_from_run_config,
)

GIB = 2**30
SOURCES = ("Catalog", "Folder or hub id", "Custom dimensions")
COMPARED = ("full", "lora", "qlora")
# One colour per term, stable across updates so the stacks read the same way every time.
TERM_COLOURS = {
    "quantized_weights": "#1f77b4",
    "quantization_constants": "#aec7e8",
    "weights_16_32bit": "#17becf",
    "adapter_weights": "#2ca02c",
    "gradients": "#98df8a",
    "optimizer_states": "#ff7f0e",
    "optimizer_states_paged": "#ffbb78",
    "activations": "#d62728",
    "logits_and_loss": "#9467bd",
    "transient_buffers": "#c5b0d5",
    "library_workspaces": "#8c564b",
    "allocator_overhead": "#c49c94",
    "cuda_context": "#7f7f7f",
}
DEFAULT_GPU = "RTX 4090 24 GB"


# ----------------------------------------------------------------------------- pure helpers
def resolve_arch(source: str, catalog_id: str | None, folder: str | None, dims: list | tuple) -> ModelArch:
    """The architecture the form points at (raises LoraLabError with a sentence)."""
    if source == "Custom dimensions":
        values = [int(v) if v not in (None, "") else 0 for v in dims]
        return arch_from_numbers(*values, name="custom")
    if source == "Folder or hub id":
        return load_arch((folder or "").strip())
    return load_arch(catalog_id or "")


# The form holds a MemorySettings field per component (same names), plus the model and the GPU.
SETTING_FIELDS = ("method", "rank", "alpha", "targets", "dora", "lora_dropout", "batch_size", "seq_len",
                  "gradient_checkpointing", "optimizer", "compute_dtype", "double_quant", "attn", "loss",
                  "kbit_upcast", "padding_free", "liger", "strategy", "processes", "fsdp_sharding", "fsdp_offload")
MODEL_FIELDS = ("source", "catalog_id", "folder", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
INT_SETTINGS = ("rank", "alpha", "batch_size", "seq_len", "processes")


def settings_from_values(values: dict[str, Any]) -> MemorySettings:
    """The form's values (keyed by MemorySettings field name) as MemorySettings."""
    text = str(values.get("targets") or "all-linear").strip()
    settings = {name: values[name] for name in SETTING_FIELDS if name in values}
    settings["targets"] = "all-linear" if text in ("", "all-linear") else \
        [part.strip() for part in text.split(",") if part.strip()]
    for name in INT_SETTINGS:
        if name in settings:
            settings[name] = int(settings[name])
    settings["lora_dropout"] = float(settings.get("lora_dropout") or 0.0)
    return MemorySettings(**settings)


def values_from_settings(settings: MemorySettings) -> dict[str, Any]:
    """MemorySettings as the form shows them (target modules comma-separated)."""
    values = {name: getattr(settings, name) for name in SETTING_FIELDS}
    if not isinstance(settings.targets, str):
        values["targets"] = ", ".join(settings.targets)
    return values


def values_from_run_config(config) -> dict[str, Any]:
    """The form's values for a RunConfig (the Train tab's form): the one way settings cross over."""
    name, settings = settings_from_run_config(config)
    catalog = name in catalog_ids()
    return {"source": "Catalog" if catalog else "Folder or hub id", "catalog_id": name if catalog else None,
            "folder": "" if catalog else name, **values_from_settings(settings)}


def compare_methods(arch: ModelArch, settings: MemorySettings) -> dict[str, MemoryEstimate]:
    """The same model and settings under full fine-tuning, LoRA and QLoRA."""
    return {method: estimate(arch, replace(settings, method=method)) for method in COMPARED}


def stacked_terms(est: MemoryEstimate) -> dict[str, int]:
    """Every term that nvidia-smi will count, in stacking order."""
    return {name: value for name, value in est.terms.items() if value > 0}


def comparison_figure(estimates: dict[str, MemoryEstimate], gpu: str | None, chosen: str | None = None) -> go.Figure:
    """Stacked bars per method, one colour per term, and the card's capacity as a line."""
    labels = [METHOD_LABELS[m] for m in estimates]
    names: list[str] = []
    for est in estimates.values():
        names += [n for n in stacked_terms(est) if n not in names]
    order = [n for n in TERM_COLOURS if n in names]
    fig = go.Figure()
    for name in order:
        values = [est.terms.get(name, 0) / GIB for est in estimates.values()]
        fig.add_trace(go.Bar(
            x=labels, y=values, name=TERM_TITLES.get(name, name), marker_color=TERM_COLOURS[name],
            hovertemplate="%{x}<br>" + TERM_TITLES.get(name, name) + ": %{y:.2f} GiB<extra></extra>",
        ))
    for label, est in zip(labels, estimates.values()):
        fig.add_annotation(x=label, y=est.nvidia_smi_bytes / GIB, text=f"{est.nvidia_smi_bytes / GIB:.1f} GiB",
                           showarrow=False, yshift=10)
    if gpu and gpu in GPUS:
        fig.add_hline(y=GPUS[gpu] / GIB, line={"dash": "dash", "color": "#111"},
                      annotation_text=f"{gpu}: {GPUS[gpu] / GIB:.1f} GiB", annotation_position="top left")
    fig.update_layout(barmode="stack", yaxis_title="GiB (as nvidia-smi shows)", legend_title="term",
                      uirevision="memory-compare", margin={"l": 50, "r": 20, "t": 40, "b": 40},
                      title=f"{next(iter(estimates.values())).model}: what each method needs")
    return fig


def terms_table(est: MemoryEstimate) -> list[list]:
    rows = [[TERM_TITLES.get(name, name), round(value / GIB, 3), est.explanations.get(name, "")]
            for name, value in est.terms.items() if value > 0]
    rows.append(["Peak allocated (torch.cuda.max_memory_allocated)", round(est.peak_allocated_bytes / GIB, 3),
                 f"at: {est.peak_phase}"])
    rows.append(["nvidia-smi", round(est.nvidia_smi_bytes / GIB, 3), "peak allocated + allocator overhead + CUDA "
                 "context + paged optimizer states"])
    return rows


def summary_markdown(arch: ModelArch, settings: MemorySettings, est: MemoryEstimate, gpu: str | None) -> str:
    lines = [
        f"**{est.model}** ({arch.total_params / 1e9:.2f} B parameters), {METHOD_LABELS[est.settings['method']]}"
        f"{per_gpu_label(est.settings)}: "
        f"peak allocated **{est.peak_allocated_bytes / GIB:.2f} GiB**, nvidia-smi about "
        f"**{est.nvidia_smi_bytes / GIB:.2f} GiB**; {est.parameters['trainable']:,} trainable parameters.",
        "",
        est.advice(),
    ]
    if gpu and gpu in GPUS:
        fits = fits_on_gpus(est)[gpu]
        verdict = "fits" if fits["fits"] else "does **not** fit"
        lines += ["", f"On **{gpu}** it {verdict} ({fits['free_bytes'] / GIB:+.2f} GiB to spare)."]
        if fits["note"]:
            lines.append(f"Note: {fits['note']}.")
        best_batch = max_batch_or_seq_that_fits(arch, settings, gpu, "batch_size", limit=512)
        best_len = max_batch_or_seq_that_fits(arch, settings, gpu, "seq_len")
        lines.append(f"Largest batch at {settings.seq_len} tokens: **{best_batch}**; longest sequence at batch "
                     f"{settings.batch_size}: **{best_len}** tokens.")
    others = [g for g, row in fits_on_gpus(est).items() if row["fits"]]
    lines += ["", "Fits on: " + (", ".join(others) if others else "none of the common cards") + "."]
    lines += [f"\n*{note}*" for note in est.notes]
    return "\n".join(lines)


def estimate_view(values: dict[str, Any]):
    """Everything the tab shows for one form state: (figure, table rows, markdown).

    ``values`` holds the model fields (``MODEL_FIELDS``), the MemorySettings fields and ``gpu``.
    """
    gpu = values.get("gpu")
    try:
        arch = resolve_arch(values.get("source"), values.get("catalog_id"), values.get("folder"),
                            [values.get(name) for name in MODEL_FIELDS[3:]])
        settings = settings_from_values(values)
        estimates = compare_methods(arch, settings)
        chosen = estimates.get(settings.normalized().method) or estimate(arch, settings)
    except (LoraLabError, ValueError, TypeError) as exc:
        return go.Figure(), [], f"**Cannot estimate:** {exc}"
    return comparison_figure(estimates, gpu), terms_table(chosen), summary_markdown(arch, settings, chosen, gpu)


def measure_from_components(runs_dir: Path, jobs, components: dict[str, Any], data: dict):
    """Gradio's {component: value} for the measurement's inputs, as names; then ``run_measure``."""
    yield from run_measure(runs_dir, jobs, {name: data[component] for name, component in components.items()})


def estimate_from_components(components: dict[str, Any], data: dict):
    """Gradio hands a set of inputs over as {component: value}; turn it back into names."""
    return estimate_view({name: data[component] for name, component in components.items()})


def from_train_form(components: dict[str, Any], *train_values) -> list:
    """'Use Train-tab settings': the Train form -> RunConfig -> this form, one update per component."""
    from ui.train_tab import form_to_config

    config, errors = form_to_config(*train_values)
    if config is None or errors:
        raise gr_error("The Train tab's form has invalid values: press Show command there to see which.")
    try:
        values = values_from_run_config(config)
    except LoraLabError as exc:
        raise gr_error(str(exc)) from exc
    updates = []
    for name in components:
        if name in ("catalog_id", "folder"):
            visible = (values["source"] == "Catalog") == (name == "catalog_id")
            updates.append(_update(value=values[name], visible=visible))
        else:
            updates.append(_update(value=values[name]) if name in values else _update())
    return updates


def gr_error(message: str):
    import gradio as gr

    return gr.Error(message)


def _update(**kwargs):
    import gradio as gr

    return gr.update(**kwargs)


def measured_peaks(run_dir: Path) -> dict[str, int | None]:
    """torch's and NVML's peaks for a run, read from its metrics.jsonl and gpu.jsonl."""
    from engine.training import rundir
    torch_peak = None
    for event in rundir.read_metrics(run_dir):
        value = event.get("torch_peak_allocated_bytes")
        if isinstance(value, (int, float)) and (torch_peak is None or value > torch_peak):
            torch_peak = int(value)
    try:
        per_gpu = rundir.load_config(run_dir).distributed.strategy != "none"  # the prediction is per GPU then
    except LoraLabError:
        per_gpu = False
    nvml_peak, source = rundir.peak_memory(rundir.read_gpu_samples(run_dir), per_gpu=per_gpu)
    return {"torch": torch_peak, "nvml": nvml_peak, "nvml_source": source}


def run_comparison_markdown(runs_dir: Path, run_name: str | None) -> str:
    """Prediction against measurement for one run directory, tolerant of missing pieces."""
    if not run_name:
        return "Pick a run to compare its measured peak with the prediction."
    try:
        from engine.memory import estimate_for_run_config
        from engine.training import rundir

        run_dir = rundir.resolve_run(Path(runs_dir), run_name)
        est = estimate_for_run_config(rundir.load_config(run_dir))
        measured = measured_peaks(run_dir)
    except (LoraLabError, OSError, ValueError) as exc:
        return f"**Cannot compare:** {exc}"
    rows = ["| | predicted | measured | error |", "|---|---|---|---|"]
    for label, predicted, value in (
        ("torch peak allocated", est.peak_allocated_bytes, measured["torch"]),
        ("GPU memory used (NVML)", est.nvidia_smi_bytes, measured["nvml"]),
    ):
        if value:
            error = f"{(predicted - value) / value:+.1%}"
            rows.append(f"| {label} | {predicted / GIB:.2f} GiB | {value / GIB:.2f} GiB | {error} |")
        else:
            rows.append(f"| {label} | {predicted / GIB:.2f} GiB | not recorded | |")
    note = ""
    if measured["nvml_source"] == "process_rss":
        note = "\n\nThis run had no NVIDIA GPU: the 'measured' memory is process RAM, not VRAM."
    if per_gpu_label(est.settings):
        note += ("\n\nPer GPU: torch's peak is rank 0's; NVML's is the run's largest share of one GPU "
                 "(on the CPU, the RAM of every rank together).")
    return f"**{run_name}** ({est.model}, {METHOD_LABELS[est.settings['method']]}{per_gpu_label(est.settings)}), " \
        f"peak at: {est.peak_phase}\n\n" + \
        "\n".join(rows) + note


def run_names(runs_dir: Path) -> list[str]:
    try:
        from engine.training import rundir
        return [summary.name for summary in rundir.list_runs(Path(runs_dir))]
    except Exception:  # noqa: BLE001 - the runs list is a convenience; the tab must still load
        return []


# ----------------------------------------------------------------------------- measured comparison
MEASURE_INTRO = (
    "Train a few steps of **full fine-tuning, LoRA and QLoRA** of one model here, each in its own worker "
    "process, and set what they really held beside the prediction. It uses the LoRA, optimizer and precision "
    "settings above, and the model, batch and length below (short, so it takes minutes on a CPU; a catalog "
    "architecture is built once with random weights: memory does not depend on their values). On a GPU the "
    "measured peak is `torch.cuda.max_memory_allocated`; on the CPU it is the peak of live tensors, and the "
    "worker's peak RSS minus its baseline is shown beside it."
)
GROUP_COLOURS = {"weights": "#1f77b4", "trainable": "#2ca02c", "activations": "#d62728"}


def measure_request_from_values(values: dict[str, Any]):
    """The form's LoRA settings plus the measurement's own model, batch, length and steps."""
    from engine.measurements import DEFAULT_MODEL, MeasureRequest

    def number(name: str, default: int) -> int:
        value = values.get(name)
        return default if value in (None, "") else int(value)

    settings = replace(settings_from_values(values), method="lora", batch_size=number("measure_batch", 1),
                       seq_len=number("measure_seq_len", 48))
    return MeasureRequest(model=str(values.get("measure_model") or DEFAULT_MODEL).strip(), settings=settings,
                          steps=number("measure_steps", 2))


def measurement_figure(result: dict) -> go.Figure:
    """Predicted and measured peak, side by side per method, stacked by group; RSS minus baseline as a marker."""
    from engine.measurements.measure import GROUPS

    methods = [m for m in result.get("methods", {}).values() if m.get("measured") or m.get("predicted")]
    fig = go.Figure()
    if not methods:
        return fig
    x = [[m["label"] for m in methods for _ in (0, 1)], ["predicted", "measured"] * len(methods)]
    for group, title in GROUPS.items():
        values = []
        for m in methods:
            for kind in ("predicted", "measured"):
                values.append(((m.get(kind) or {}).get("groups") or {}).get(group, 0) / GIB)
        fig.add_trace(go.Bar(x=x, y=values, name=title, marker_color=GROUP_COLOURS[group],
                             hovertemplate="%{x}<br>" + title + ": %{y:.3f} GiB<extra></extra>"))
    peaks = [((m.get(kind) or {}).get("peak_bytes") or 0) / GIB for m in methods for kind in ("predicted", "measured")]
    rss = [None if kind == "predicted" or result.get("device") == "cuda" else
           ((m.get("measured") or {}).get("rss_peak_minus_baseline_bytes") or 0) / GIB
           for m in methods for kind in ("predicted", "measured")]
    # Each bar's total above the bar, and above its RSS diamond when that is higher, so the two never overlap.
    lift = 0.04 * max(peaks + [level or 0 for level in rss])  # about half a diamond at the chart's scale
    tops = [max(peak, (level or 0) + lift) for peak, level in zip(peaks, rss)]
    fig.add_trace(go.Scatter(x=x, y=tops, mode="text", text=[f"{v:.2f} GiB" if v else "" for v in peaks],
                             textposition="top center", showlegend=False, hoverinfo="skip"))
    if any(rss):
        fig.add_trace(go.Scatter(x=x, y=rss, mode="markers", name="peak RSS minus process baseline",
                                 marker={"symbol": "diamond", "size": 11, "color": "#111"},
                                 hovertemplate="%{x}<br>peak RSS minus baseline: %{y:.3f} GiB<extra></extra>"))
    unit = "torch.cuda.max_memory_allocated" if result.get("device") == "cuda" else "peak of live tensors"
    headline = (result.get("summary") or [""])[0]
    fig.update_layout(barmode="stack", yaxis_title=f"GiB ({unit})", legend_title="at the peak",
                      margin={"l": 50, "r": 20, "t": 60, "b": 60}, uirevision="memory-measured",
                      title={"text": f"{result.get('model_name') or result.get('model')}: measured beside predicted"
                                     f"<br><sup>{headline}</sup>"})
    return fig


def measurement_markdown(result: dict) -> str:
    """The headline sentences, what was run, and the machine's notes."""
    state = result.get("state", "complete")
    if state != "complete":
        runs = ", ".join(f"{m}: {s}" for m, s in (result.get("runs") or {}).items())
        return f"**{result.get('id')}** ({result.get('model')}) is {state}: {runs}."
    s = result.get("settings") or {}
    first = next(iter(result.get("methods", {}).values()), {})
    shape = (first.get("measured") or {}).get("batch_shape") or [s.get("batch_size"), s.get("seq_len")]
    summary = result.get("summary", [])
    lines = [" ".join(f"**{sentence}**" if i == 0 else sentence for i, sentence in enumerate(summary)),
             "",
             f"{result.get('model_name') or result.get('model')} ({(result.get('parameters') or 0) / 1e6:.0f} M "
             f"parameters) on "
             f"{result.get('device')}, {result.get('steps')} steps of batch {shape[0]} x {shape[1]} tokens, "
             f"rank {s.get('rank')}, {s.get('optimizer')}, "
             f"checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}; "
             f"took {result.get('wall_s') or 0:.0f} s ({result.get('cpu_seconds') or 0:.0f} CPU-seconds in the "
             f"three workers). Saved as `{result.get('id')}`."]
    notes = result.get("notes", []) + sorted({n for m in result.get("methods", {}).values()
                                               for n in m.get("fallbacks", [])})
    if notes:
        lines += ["", "Machine notes: " + " ".join(notes)]
    lines += ["", "Groups at the peak: *weights* of the base model; *trainable state*: adapters, gradients and "
                  "optimizer states; *activations*: what forward and backward keep, and temporaries."]
    if result.get("device") != "cuda":
        lines += ["", "*Measured* is the peak of live tensors (every tensor torch created, rounded to 512 bytes as "
                      "the CUDA allocator does), split by what was alive at that moment. The diamond is the worker's "
                      "peak resident memory while training minus its baseline before the weights loaded (freed heap "
                      "handed back to the OS first): the operating system's view, with allocator caches and library "
                      "buffers."]
    return "\n".join(lines)


def measurement_rows(result: dict) -> list[list]:
    from engine.measurements import measurement_table

    return measurement_table(result)


def saved_measurement_choices(runs_dir: Path) -> list[tuple[str, str]]:
    from engine.measurements import list_measurements

    try:
        rows = list_measurements(Path(runs_dir))
    except OSError:
        return []
    return [(f"{row['id']} ({row['state']})" + (f": {row['headline']}" if row["headline"] else ""), row["id"])
            for row in rows]


def show_measurement(runs_dir: Path, measurement_id: str | None):
    """(markdown, figure, table rows) of a saved measurement."""
    if not measurement_id:
        return "No measurement yet: press the button above.", go.Figure(), []
    from engine.measurements import read_measurement, resolve_measurement

    try:
        result = read_measurement(resolve_measurement(Path(runs_dir), measurement_id))
    except LoraLabError as exc:
        return f"**Cannot show it:** {exc}", go.Figure(), []
    return measurement_markdown(result), measurement_figure(result), measurement_rows(result)


def load_saved_measurements(runs_dir: Path):
    """On page load: the saved measurements, the newest shown (a restarted dashboard shows it again)."""
    choices = saved_measurement_choices(runs_dir)
    latest = choices[0][1] if choices else None
    text, figure, rows = show_measurement(runs_dir, latest)
    return (_update(choices=choices, value=latest), text, figure, rows, _timer_update(active=False))


def _timer_update(**kwargs):
    import gradio as gr

    return gr.Timer(**kwargs)


def run_measure(runs_dir: Path, jobs, values: dict[str, Any]):
    """The button: measure in a background thread, yield (status, figure, table, saved list) as it goes.

    The thread owns the measurement, so a closed browser does not stop it; the result is saved
    and listed when the page is opened again.
    """
    import queue
    import threading

    from engine.measurements import run_measurement

    try:
        request = measure_request_from_values(values).check()
    except (LoraLabError, ValueError, TypeError) as exc:
        yield f"**Cannot measure:** {exc}", _update(), _update(), _update()
        return
    lines: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work():
        try:
            busy = (lambda: jobs.active_name()) if jobs is not None else None
            outcome["result"] = run_measurement(request, Path(runs_dir), progress=lines.put, jobs_busy=busy)
        except LoraLabError as exc:
            outcome["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - the page says what happened instead of a traceback
            outcome["error"] = f"The measurement failed with {type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="memory-measure", daemon=True)
    thread.start()
    shown: list[str] = []
    while thread.is_alive() or not lines.empty():
        try:
            shown.append(lines.get(timeout=1.0))
        except queue.Empty:
            continue
        yield "Measuring…\n\n" + "\n\n".join(f"`{line}`" for line in shown[-6:]), _update(), _update(), _update()
    thread.join()
    if "error" in outcome:
        yield f"**Cannot measure:** {outcome['error']}", _update(), _update(), _update()
        return
    result = dict(outcome["result"], state="complete")
    yield (measurement_markdown(result), measurement_figure(result), measurement_rows(result),
           _update(choices=saved_measurement_choices(runs_dir), value=result["id"]))


def on_source(choice: str):
    return (_update(visible=choice == "Catalog"), _update(visible=choice == "Folder or hub id"),
            _update(visible=choice == "Custom dimensions"))


def run_names_update(runs_dir: Path):
    return _update(choices=run_names(runs_dir))


# ----------------------------------------------------------------------------- layout
def build(ctx) -> None:
    import gradio as gr

    gr.Markdown("Predict GPU memory before a run, term by term; after a run, compare with what was measured.")
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(list(SOURCES), value="Catalog", label="Model")
            catalog_id = gr.Dropdown(catalog_ids(), value="llama-3.1-8b", label="Catalog model")
            folder = gr.Textbox(label="Folder with config.json, 'demo', or hub id", visible=False)
            with gr.Group(visible=False) as dims_group:
                hidden = gr.Number(4096, label="hidden size", precision=0)
                layers = gr.Number(32, label="layers", precision=0)
                heads = gr.Number(32, label="attention heads", precision=0)
                kv_heads = gr.Number(8, label="KV heads", precision=0)
                intermediate = gr.Number(14336, label="intermediate size", precision=0)
                vocab = gr.Number(128256, label="vocabulary", precision=0)
            # The Train tab (built first) shares its form components and a function turning their values into a
            # run config dict, so this button reads what the Train tab shows in this browser, not a global.
            use_train = None
            if ctx.train_form:
                use_train = gr.Button("Use Train-tab settings", size="sm")
        with gr.Column(scale=1):
            method = gr.Radio([(METHOD_LABELS[m], m) for m in ("full", "lora", "qlora", "lora8bit")], value="qlora",
                              label="Method (the table and text follow it)")
            with gr.Row():
                rank = gr.Number(16, label="rank", precision=0, minimum=1)
                alpha = gr.Number(32, label="alpha", precision=0, minimum=1)
            targets = gr.Textbox("all-linear", label="target modules (all-linear or comma-separated)")
            with gr.Row():
                dora = gr.Checkbox(False, label="DoRA")
                dropout = gr.Number(0.0, label="LoRA dropout", minimum=0, maximum=0.99)
        with gr.Column(scale=1):
            with gr.Row():
                batch = gr.Number(1, label="batch size", precision=0, minimum=1)
                seq_len = gr.Number(2048, label="sequence length", precision=0, minimum=2)
            grad_ckpt = gr.Checkbox(True, label="gradient checkpointing")
            optimizer = gr.Dropdown(sorted(set(OPTIMIZERS.values())), value="adamw_torch_fused", label="optimizer")
            dtype = gr.Dropdown(["bfloat16", "float16", "float32"], value="bfloat16", label="compute dtype")
            with gr.Accordion("More", open=False):
                double_quant = gr.Checkbox(True, label="double quantization (QLoRA)")
                kbit_upcast = gr.Checkbox(True, label="prepare_model_for_kbit_training (fp32 non-quantized weights)")
                attn = gr.Dropdown(["sdpa", "flash", "eager"], value="sdpa", label="attention")
                loss = gr.Dropdown([("chunked (TRL fused LM head)", "chunked"),
                                    ("full logits (transformers loss)", "full_logits")],
                                   value="chunked", label="loss")
                padding_free = gr.Checkbox(False, label="padding-free batches (padding_free, or bfd packing)")
                liger = gr.Checkbox(False, label="Liger kernels")
            with gr.Accordion("Several GPUs (per-GPU estimate)", open=False):
                strategy = gr.Radio([("one GPU", "none"), ("DDP (replicated)", "ddp"), ("FSDP (sharded)", "fsdp")],
                                    value="none", label="strategy")
                processes = gr.Number(1, label="GPUs (processes) in all", precision=0, minimum=1)
                fsdp_sharding = gr.Dropdown(list(FSDP_SHARDING),
                                            value="FULL_SHARD", label="FSDP sharding")
                fsdp_offload = gr.Checkbox(False, label="FSDP CPU offload (parameters and optimizer states)")
            gpu = gr.Dropdown(list(GPUS), value=DEFAULT_GPU, label="GPU")
    estimate_button = gr.Button("Estimate", variant="primary")
    figure = gr.Plot(label="Full vs LoRA vs QLoRA")
    summary = gr.Markdown()
    table = gr.Dataframe(headers=["term", "GiB", "why"], datatype=["str", "number", "str"], wrap=True,
                         label="Terms of the chosen method")

    components = {"source": source, "catalog_id": catalog_id, "folder": folder, "hidden": hidden, "layers": layers,
                  "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate, "vocab": vocab,
                  "method": method, "rank": rank, "alpha": alpha, "targets": targets, "dora": dora,
                  "lora_dropout": dropout, "batch_size": batch, "seq_len": seq_len, "gradient_checkpointing": grad_ckpt,
                  "optimizer": optimizer, "compute_dtype": dtype, "double_quant": double_quant, "attn": attn,
                  "loss": loss, "kbit_upcast": kbit_upcast, "padding_free": padding_free, "liger": liger,
                  "strategy": strategy, "processes": processes, "fsdp_sharding": fsdp_sharding,
                  "fsdp_offload": fsdp_offload, "gpu": gpu}
    estimate = partial(estimate_from_components, components)
    inputs = set(components.values())
    estimate_button.click(estimate, inputs, [figure, table, summary])
    source.change(on_source, [source], [catalog_id, folder, dims_group])
    if use_train is not None:
        use_train.click(partial(from_train_form, components), ctx.train_form, list(components.values())).then(
            estimate, inputs, [figure, table, summary])

    with gr.Accordion("After a run: prediction against measurement", open=False):
        with gr.Row():
            run_pick = gr.Dropdown(run_names(ctx.runs_dir), label="Run", allow_custom_value=False)
            refresh = gr.Button("Refresh runs", size="sm")
        comparison = gr.Markdown("Pick a run to compare its measured peak with the prediction.")
        refresh.click(partial(run_names_update, ctx.runs_dir), None, [run_pick])
        run_pick.change(partial(run_comparison_markdown, ctx.runs_dir), [run_pick], [comparison])

    from engine.measurements import DEFAULT_MODEL
    from engine.measurements.measure import TABLE_HEADERS

    with gr.Accordion("Measured here: full vs LoRA vs QLoRA", open=True, elem_id="loralab-measured"):
        gr.Markdown(MEASURE_INTRO)
        with gr.Row():
            measure_model = gr.Dropdown([DEFAULT_MODEL, *[c for c in catalog_ids() if c != DEFAULT_MODEL], "demo"],
                                        value=DEFAULT_MODEL, allow_custom_value=True,
                                        label="Model (catalog architecture, folder, 'demo' or hub id)")
            measure_batch = gr.Number(1, label="batch size", precision=0, minimum=1)
            measure_seq_len = gr.Number(48, label="sequence length", precision=0, minimum=8)
            measure_steps = gr.Number(2, label="steps per method", precision=0, minimum=1, maximum=50)
        measure_button = gr.Button("Measure full, LoRA and QLoRA here", variant="primary", elem_id="loralab-measure")
        measure_status = gr.Markdown(elem_id="loralab-measure-status")
        measured_plot = gr.Plot(label="Measured beside predicted", elem_id="loralab-measured-plot")
        measured_table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True,
                                      label="Per method, group by group", elem_id="loralab-measured-table")
        with gr.Row():
            saved = gr.Dropdown([], label="Saved measurements", allow_custom_value=False,
                                elem_id="loralab-saved-measurements")
            saved_refresh = gr.Button("Refresh", size="sm")
        loader = gr.Timer(0.2, active=True)  # once per page load: list the saved measurements, show the newest

    measure_components = {**components, "measure_model": measure_model, "measure_batch": measure_batch,
                          "measure_seq_len": measure_seq_len, "measure_steps": measure_steps}
    measure_button.click(
        partial(measure_from_components, ctx.runs_dir, ctx.jobs, measure_components), set(measure_components.values()),
        [measure_status, measured_plot, measured_table, saved], api_name="measure_memory")
    saved.change(partial(show_measurement, ctx.runs_dir), [saved], [measure_status, measured_plot, measured_table],
                 api_name="show_measurement")
    saved_refresh.click(lambda: _update(choices=saved_measurement_choices(ctx.runs_dir)), None, [saved])
    loader.tick(partial(load_saved_measurements, ctx.runs_dir), None,
                [saved, measure_status, measured_plot, measured_table, loader])
