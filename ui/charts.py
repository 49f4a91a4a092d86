"""Plotly figures for the Train tab, built from metrics.jsonl events and gpu.jsonl samples.

Pure functions: lists of dicts in, a ``plotly.graph_objects.Figure`` out; no gradio and
no file access, so they are cheap to test and to call on every timer tick.

``gr.Plot`` resends the whole figure on every update, so every trace is downsampled to
at most ``MAX_POINTS`` points (keeping first, last and the spikes), and every figure
carries a stable ``layout.uirevision`` so a user's zoom survives the refresh.

Metric events (one per line of metrics.jsonl; any key may be missing)::

    {"event": "log"|"eval", "step", "epoch", "loss", "eval_loss", "learning_rate",
     "grad_norm", "tokens_per_second", "elapsed_s", "eta_s", "t"}
    {"event": "task_eval", "step", "metric", "score", "n", "valid_json", "seconds", "t"}

A ``{"event": "resume", "step": S}`` event marks a resume: earlier events above step S were
rolled back and are not drawn.

Memory samples: the format documented in ``engine.training.sampler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative

from engine.training.rundir import current_records

MAX_POINTS = 500
DEFAULT_SMOOTHING = 0.9
GIB = 2**30
RSS_TITLE = "Training process RAM (no NVIDIA GPU) — not VRAM"
_COLOURS = qualitative.Plotly

Metrics = Sequence[Mapping[str, Any]]


# --------------------------------------------------------------------------- helpers


def downsample(xs: Sequence, ys: Sequence, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """At most ``max_points`` points that still show the series' shape.

    Points whose y is not a finite number are dropped. The first and last points are
    kept; the rest is cut into equal buckets and each bucket keeps its lowest and highest
    point, in order, so spikes (a loss blow-up, a memory peak) survive. The global min
    and max are always kept when ``max_points >= 4``.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    points = [(x, y) for x, y in zip(xs, ys) if _is_number(y)]
    if len(points) <= max_points:
        return [p[0] for p in points], [p[1] for p in points]
    inner = points[1:-1]
    buckets = (max_points - 2) // 2
    kept = [points[0]]
    for b in range(buckets):
        chunk = inner[b * len(inner) // buckets : (b + 1) * len(inner) // buckets]
        if not chunk:
            continue
        low = min(range(len(chunk)), key=lambda i: chunk[i][1])
        high = max(range(len(chunk)), key=lambda i: chunk[i][1])
        kept.extend(chunk[i] for i in sorted({low, high}))
    kept.append(points[-1])
    return [p[0] for p in kept], [p[1] for p in kept]


def ema(values: Sequence[float], smoothing: float = DEFAULT_SMOOTHING) -> list[float]:
    """Debiased exponential moving average, the smoothing TensorBoard applies to loss.

    The bias correction keeps the first values from being pulled toward zero (or, with
    a plain EMA seeded on the first value, toward the first, highest loss).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = smoothing * average + (1.0 - smoothing) * value
        out.append(average / (1.0 - smoothing**i))
    return out


def empty_figure(message: str = "No metrics yet", uirevision: str = "empty") -> go.Figure:
    """A blank figure that says why it is blank, instead of an error or empty axes."""
    fig = go.Figure()
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, uirevision)


def _light_template() -> go.layout.Template:
    """plotly_white's layout alone (colours, grid, fonts), without its defaults for every trace type.

    Every figure carries its template, and plotly validates and copies it on each build: the full
    plotly_white made a third of the cost of a chart rebuilt for every new metrics line, and 7 KB of
    every payload sent to every viewer. The charts here only draw scatter lines on 2-D axes, which
    look the same with the layout part alone.
    """
    import plotly.io as pio

    return go.layout.Template(layout=pio.templates["plotly_white"].layout)


_TEMPLATE = None


def _finish(fig: go.Figure, uirevision: str, title: str | None = None) -> go.Figure:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _light_template()
    fig.update_layout(
        title=title,
        uirevision=uirevision,
        template=_TEMPLATE,
        hovermode="x unified",
        margin={"l": 60, "r": 60, "t": 50 if title else 20, "b": 40},
        # Below the plot: a legend that wraps onto a second line must not cover the title.
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0},
    )
    return fig


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_runs(
    metrics: Metrics | Mapping[str, Metrics] | None, runs: Mapping[str, Metrics] | None
) -> dict[str, Metrics]:
    """One run (a list) or several (``{name: list}``), plus ``runs`` to compare against.

    Steps rolled back by a resume are dropped (``rundir.current_records``), so a line never
    runs backwards, wherever the events came from.
    """
    if isinstance(metrics, Mapping):
        combined = dict(metrics)
    else:
        combined = {"": metrics or []}
    combined.update(runs or {})
    return {name: current_records([e for e in events if isinstance(e, Mapping)]) for name, events in combined.items()}


def _series(events: Iterable[Mapping[str, Any]], key: str, when=None) -> tuple[list, list]:
    xs, ys = [], []
    for event in events:
        if when is not None and not when(event):
            continue
        if _is_number(event.get("step")) and _is_number(event.get(key)):
            xs.append(event["step"])
            ys.append(event[key])
    return xs, ys


def _label(run: str, what: str) -> str:
    return f"{run} · {what}" if run else what


def _line(xs, ys, name: str, colour: str, group: str, line: dict | None = None, **style) -> go.Scatter:
    """One downsampled trace; ``group`` ties a run's (or a GPU's) traces together in the legend."""
    xs, ys = downsample(xs, ys)
    return go.Scatter(
        x=xs, y=ys, name=name, legendgroup=group, line={"color": colour, **(line or {})}, **style
    )


# --------------------------------------------------------------------------- metrics


def loss_figure(
    metrics: Metrics | Mapping[str, Metrics] | None,
    runs: Mapping[str, Metrics] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    uirevision: str = "loss",
) -> go.Figure:
    """Train loss (faint raw line plus its EMA) and eval loss markers on the same axes, and the
    task metric's score (``task_eval`` events, 0 to 1) on a right-hand axis.

    ``metrics`` is one run's events, or ``{run_name: events}``; ``runs`` adds more runs
    to overlay for comparison (each run keeps one colour for all its traces).
    """
    fig = go.Figure()
    all_runs = _as_runs(metrics, runs)
    for i, (run, events) in enumerate(all_runs.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        steps, losses = _series(events, "loss", when=lambda e: e.get("event") != "eval")
        if steps:
            fig.add_trace(
                _line(
                    steps,
                    losses,
                    _label(run, "train loss"),
                    colour,
                    run,
                    opacity=0.3,
                    mode="lines",
                    line={"width": 1},
                )
            )
            # Smooth the full series, then downsample: smoothing a downsampled series would
            # change the curve with the number of points.
            fig.add_trace(
                _line(
                    steps,
                    ema(losses, smoothing),
                    _label(run, "train loss (EMA)"),
                    colour,
                    run,
                    mode="lines",
                    line={"width": 2.5},
                )
            )
        eval_steps, eval_losses = _series(events, "eval_loss")
        if eval_steps:
            fig.add_trace(
                _line(
                    eval_steps,
                    eval_losses,
                    _label(run, "eval loss"),
                    colour,
                    run,
                    mode="lines+markers",
                    marker={"symbol": "diamond", "size": 9},
                    line={"dash": "dot"},
                )
            )
    task_traces = _task_score_traces(all_runs)
    if not fig.data and not task_traces:
        return empty_figure("No metrics yet", uirevision)
    fig.add_traces(task_traces)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss")
    if task_traces:
        # Scores live in [0, 1] whatever the loss scale: their own axis on the right, fixed so it never jumps.
        fig.update_layout(yaxis2={"title": "task score", "overlaying": "y", "side": "right", "range": [0, 1.02],
                                  "showgrid": False, "tickformat": ".0%"})
    return _finish(fig, uirevision, "Loss and task score" if task_traces else "Loss")


def _task_score_traces(all_runs: Mapping[str, Metrics]) -> list[go.Scatter]:
    """Each run's task metric (``task_eval`` events) against step, for the right-hand axis.

    One run: its own colour, so it reads apart from the loss lines. Several: the run's colour,
    squares instead of diamonds. The metric's name is in the legend.
    """
    traces = []
    for i, (run, events) in enumerate(all_runs.items()):
        evals = [e for e in events if e.get("event") == "task_eval"]
        steps, scores = _series(evals, "score")
        if not steps:
            continue
        metric = evals[-1].get("metric") or "task score"
        colour = _COLOURS[2] if len(all_runs) == 1 else _COLOURS[i % len(_COLOURS)]
        traces.append(_line(steps, scores, _label(run, f"{metric} (right axis)"), colour, run, yaxis="y2",
                            mode="lines+markers", marker={"symbol": "square", "size": 8}, line={"width": 2}))
    return traces


def lr_gradnorm_figure(
    metrics: Metrics | Mapping[str, Metrics] | None,
    runs: Mapping[str, Metrics] | None = None,
    uirevision: str = "lr-gradnorm",
) -> go.Figure:
    """Learning rate (left axis) and gradient norm (right axis) against step."""
    fig = go.Figure()
    all_runs = _as_runs(metrics, runs)
    for i, (run, events) in enumerate(all_runs.items()):
        # One run: a colour per quantity. Several: a colour per run, dots for grad norm.
        lr_colour = _COLOURS[i % len(_COLOURS)]
        norm_colour = _COLOURS[1] if len(all_runs) == 1 else lr_colour
        steps, lrs = _series(events, "learning_rate")
        if steps:
            fig.add_trace(
                _line(steps, lrs, _label(run, "learning rate"), lr_colour, run, mode="lines", yaxis="y")
            )
        steps, norms = _series(events, "grad_norm")
        if steps:
            fig.add_trace(
                _line(
                    steps,
                    norms,
                    _label(run, "grad norm"),
                    norm_colour,
                    run,
                    mode="lines",
                    yaxis="y2",
                    line={"dash": "dot"},
                )
            )
    if not fig.data:
        return empty_figure("No metrics yet", uirevision)
    fig.update_layout(
        xaxis={"title": "step"},
        yaxis={"title": "learning rate", "exponentformat": "e"},
        yaxis2={
            "title": "grad norm",
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "tickmode": "auto",
        },
    )
    return _finish(fig, uirevision, "Learning rate and gradient norm")


def throughput_figure(
    metrics: Metrics | Mapping[str, Metrics] | None,
    runs: Mapping[str, Metrics] | None = None,
    uirevision: str = "throughput",
) -> go.Figure:
    """Training throughput in tokens per second against step."""
    fig = go.Figure()
    for i, (run, events) in enumerate(_as_runs(metrics, runs).items()):
        steps, rates = _series(events, "tokens_per_second")
        if steps:
            fig.add_trace(
                _line(steps, rates, _label(run, "tokens/s"), _COLOURS[i % len(_COLOURS)], run, mode="lines")
            )
    if not fig.data:
        return empty_figure("No metrics yet", uirevision)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="tokens/s", rangemode="tozero")
    return _finish(fig, uirevision, "Throughput")


# --------------------------------------------------------------------------- memory


def memory_figure(
    samples: Sequence[Mapping[str, Any]] | None,
    predicted_peak_bytes: int | None = None,
    runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    uirevision: str = "memory",
) -> go.Figure:
    """Memory over time: each GPU's used and total, the training process's share, and
    the calculator's predicted peak as a dashed line.

    With ``runs`` (``{run_name: samples}``) it compares runs instead: each run's
    training-process memory against time since that run's first sample (``samples``,
    if any, is drawn as "this run"). Samples with ``source == "process_rss"`` are
    labelled as RAM, never as VRAM.
    """
    samples = [s for s in samples or [] if _is_number(s.get("t"))]
    if runs:
        fig, title, y_title = _compare_memory(samples, runs)
    elif samples:
        fig, title, y_title = _live_memory(samples)
    else:
        return empty_figure("No memory samples yet", uirevision)
    if not fig.data:
        return empty_figure("No memory samples yet", uirevision)
    if predicted_peak_bytes:
        # On a RAM chart the calculator's number is still a GPU figure: say so.
        what = "VRAM " if title.startswith(RSS_TITLE) else ""
        fig.add_hline(
            y=predicted_peak_bytes / GIB,
            line={"dash": "dash", "color": "#d62728"},
            annotation_text=f"predicted {what}peak {predicted_peak_bytes / GIB:.2f} GiB",
            annotation_position="top left",
        )
    fig.update_yaxes(title=y_title, rangemode="tozero")
    return _finish(fig, uirevision, title)


def _live_memory(samples: list[Mapping[str, Any]]) -> tuple[go.Figure, str, str]:
    rss = samples[-1].get("source") == "process_rss"
    times = [datetime.fromtimestamp(s["t"]) for s in samples]
    fig = go.Figure()
    devices: dict[int, dict[str, list]] = {}
    for when, sample in zip(times, samples):
        for device in sample.get("devices") or []:
            series = devices.setdefault(
                device["index"], {"t": [], "used": [], "total": [], "run": [], "name": device.get("name")}
            )
            series["t"].append(when)
            series["used"].append(_gib(device.get("used_bytes")))
            series["total"].append(_gib(device.get("total_bytes")))
            series["run"].append(_gib(device.get("process_bytes")))
    for index, series in sorted(devices.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        group = f"gpu{index}"
        hover = f"{series['name'] or f'GPU {index}'}: %{{y:.2f}} GiB<extra></extra>"
        fig.add_trace(
            _line(
                series["t"],
                series["used"],
                f"GPU {index} used",
                colour,
                group,
                mode="lines",
                hovertemplate=hover,
            )
        )
        fig.add_trace(
            _line(
                series["t"],
                series["total"],
                f"GPU {index} total",
                colour,
                group,
                mode="lines",
                line={"dash": "dot", "width": 1},
            )
        )
    # A multi-GPU run: its own memory on each GPU it uses (one rank per GPU), one trace each.
    in_use = {index: series for index, series in devices.items()
              if any(value for value in series["run"] if value is not None)}
    if len(in_use) > 1:
        for index, series in sorted(in_use.items()):
            fig.add_trace(_line(series["t"], series["run"], f"GPU {index}: this run", _COLOURS[index % len(_COLOURS)],
                                f"gpu{index}", mode="lines", line={"dash": "dash", "width": 2}))
    process_name = (
        "training process RAM"
        if rss
        else ("training process (all GPUs)" if len(devices) > 1 else "training process")
    )
    fig.add_trace(
        _line(
            times,
            [_gib(s.get("process_bytes")) for s in samples],
            process_name,
            "#2ca02c" if len(devices) < 2 else "#222222",
            "process",
            mode="lines",
            fill="tozeroy",
        )
    )
    _add_errors(fig, times, samples)
    fig.data = tuple(trace for trace in fig.data if len(trace.x))  # no empty legend entries
    fig.update_xaxes(title="time")
    if rss:
        return fig, RSS_TITLE, "RAM (GiB)"
    return fig, "GPU memory", "VRAM (GiB)"


def _compare_memory(
    samples: list, runs: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[go.Figure, str, str]:
    named = ({"this run": samples} if samples else {}) | dict(runs)
    fig = go.Figure()
    sources = set()
    for i, (run, run_samples) in enumerate(named.items()):
        run_samples = [s for s in run_samples if _is_number(s.get("t"))]
        if not run_samples:
            continue
        rss = run_samples[-1].get("source") == "process_rss"
        sources.add(rss)
        start = run_samples[0]["t"]
        elapsed = [s["t"] - start for s in run_samples]
        values = [s.get("process_bytes") for s in run_samples]
        what = "RAM" if rss else "VRAM"
        if not rss and not any(_is_number(v) for v in values):
            # NVML could not attribute memory to the worker (e.g. a container's PID
            # namespace): whole-device use is the closest honest stand-in, and says so.
            values = [_device_used(s) for s in run_samples]
            what = "device VRAM used"
        fig.add_trace(
            _line(
                elapsed,
                [_gib(v) for v in values],
                f"{run} ({what})",
                _COLOURS[i % len(_COLOURS)],
                run,
                mode="lines",
            )
        )
    fig.update_xaxes(title="seconds since the run started")
    if sources == {True}:
        return fig, f"{RSS_TITLE}, by run", "RAM (GiB)"
    if sources == {True, False}:
        return fig, "Memory by run (RAM where there was no NVIDIA GPU — not VRAM)", "GiB"
    return fig, "Training process GPU memory by run", "VRAM (GiB)"


def _add_errors(fig: go.Figure, times: list, samples: list) -> None:
    """Failed readings as red marks on the time axis, the reason in the hover."""
    failed = [(when, s["error"]) for when, s in zip(times, samples) if s.get("error")]
    if failed:
        xs, texts = zip(*failed[-MAX_POINTS:])
        fig.add_trace(
            go.Scatter(
                x=list(xs),
                y=[0] * len(xs),
                text=list(texts),
                mode="markers",
                name="reading failed",
                marker={"symbol": "x", "color": "#d62728", "size": 8},
                hovertemplate="%{text}<extra></extra>",
            )
        )


def _device_used(sample: Mapping[str, Any]) -> int | None:
    used = [d.get("used_bytes") for d in sample.get("devices") or [] if _is_number(d.get("used_bytes"))]
    return sum(used) if used else None


def _gib(value: Any) -> float | None:
    return value / GIB if _is_number(value) else None


# --------------------------------------------------------------------------- sweeps


def _value_colours(count: int) -> list[str]:
    """``count`` colours along a sequential scale (Viridis), so runs read in the order of their value."""
    from plotly.colors import sample_colorscale

    if count <= 1:
        return sample_colorscale("Viridis", [0.0])
    return sample_colorscale("Viridis", [i / (count - 1) * 0.9 for i in range(count)])


def sweep_loss_figure(curves: Mapping[str, Metrics], smoothing: float = DEFAULT_SMOOTHING,
                      uirevision: str = "sweep-loss") -> go.Figure:
    """A sweep's runs overlaid, in the order of their value (``{"r=2": events, "r=8": events}``): train
    loss (EMA) as a line and eval loss as markers, each run one colour of a sequential scale."""
    fig = go.Figure()
    runs = _as_runs(dict(curves), None)
    for colour, (label, events) in zip(_value_colours(len(runs)), runs.items()):
        steps, losses = _series(events, "loss", when=lambda e: e.get("event") != "eval")
        if steps:
            fig.add_trace(_line(steps, ema(losses, smoothing), _label(label, "train loss (EMA)"), colour, label,
                                mode="lines", line={"width": 2}))
        eval_steps, eval_losses = _series(events, "eval_loss", when=lambda e: (e.get("step") or 0) > 0)
        if eval_steps:
            fig.add_trace(_line(eval_steps, eval_losses, _label(label, "eval loss"), colour, label,
                                mode="lines+markers", marker={"symbol": "diamond", "size": 9}, line={"dash": "dot"}))
    if not fig.data:
        return empty_figure("No metrics yet", uirevision)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss")
    return _finish(fig, uirevision, "Loss by value")


def pareto_figure(points: Sequence[Mapping[str, Any]], cost_title: str, uirevision: str = "pareto") -> go.Figure:
    """Quality against a cost: one marker per run (``{"label", "quality", "cost", "front"}``, lower is better on
    both axes); the non-dominated runs (``front``) are joined by a line and drawn larger."""
    known = [p for p in points if _is_number(p.get("quality")) and _is_number(p.get("cost"))]
    if not known:
        return empty_figure("No finished run with an eval loss yet", uirevision)
    fig = go.Figure()
    others = [p for p in known if not p.get("front")]
    front = sorted((p for p in known if p.get("front")), key=lambda p: p["cost"])
    if others:
        fig.add_trace(go.Scatter(x=[p["cost"] for p in others], y=[p["quality"] for p in others],
                                 text=[p["label"] for p in others], mode="markers+text", textposition="top center",
                                 name="dominated", marker={"size": 10, "color": "#9ca3af"}))
    if front:
        fig.add_trace(go.Scatter(x=[p["cost"] for p in front], y=[p["quality"] for p in front],
                                 text=[p["label"] for p in front], mode="lines+markers+text",
                                 textposition="top center", name="Pareto front (non-dominated)",
                                 marker={"size": 14, "color": "#2563eb", "symbol": "star"},
                                 line={"dash": "dot", "color": "#2563eb"}))
    # Room around the markers, so the labels above the first and last ones are not cut at the edges.
    costs, qualities = [p["cost"] for p in known], [p["quality"] for p in known]
    pad_x = (max(costs) - min(costs)) * 0.12 or abs(max(costs)) * 0.1 or 1.0
    pad_y = (max(qualities) - min(qualities)) * 0.15 or abs(max(qualities)) * 0.1 or 1.0
    fig.update_xaxes(title=cost_title, range=[min(costs) - pad_x, max(costs) + pad_x])
    fig.update_yaxes(title="final eval loss (lower is better)", range=[min(qualities) - pad_y, max(qualities) + pad_y])
    fig = _finish(fig, uirevision, f"Eval loss against {cost_title}")
    fig.update_layout(hovermode="closest")
    return fig
