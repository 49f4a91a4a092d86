"""The Train tab's Plotly figures, built from synthetic metrics and memory samples."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ui.charts import (
    GIB,
    MAX_POINTS,
    RSS_TITLE,
    downsample,
    ema,
    loss_figure,
    lr_gradnorm_figure,
    memory_figure,
    throughput_figure,
)

REPO = Path(__file__).resolve().parent.parent


def training_events(steps: int, eval_every: int = 10, seed: int = 0) -> list[dict]:
    """What a worker writes: a log event per step, an eval event every ``eval_every`` steps."""
    rng = random.Random(seed)
    events = []
    for step in range(1, steps + 1):
        events.append(
            {
                "event": "log",
                "step": step,
                "epoch": step / steps,
                "loss": 2.0 / math.sqrt(step) + rng.uniform(0, 0.3),
                "learning_rate": 2e-4 * (1 - step / (steps + 1)),
                "grad_norm": rng.uniform(0.5, 1.5),
                "tokens_per_second": 1000 + rng.uniform(-50, 50),
                "t": 1000.0 + step,
            }
        )
        if step % eval_every == 0:
            events.append(
                {"event": "eval", "step": step, "epoch": step / steps, "eval_loss": 1.5 / math.sqrt(step)}
            )
    return events


def trace(fig, name):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, f"expected one trace named {name!r}, got {[t.name for t in fig.data]}"
    return matches[0]


def closed_form_ema(values, smoothing):
    """Debiased EMA written as the weighted average it is: sum s^(t-k) y_k / sum s^(t-k)."""
    out = []
    for t in range(len(values)):
        weights = [smoothing ** (t - k) for k in range(t + 1)]
        out.append(sum(w * y for w, y in zip(weights, values)) / sum(weights))
    return out


# --------------------------------------------------------------------------- downsample


@pytest.mark.parametrize("n, max_points", [(10_000, 500), (1_001, 500), (999, 4), (50_000, 101)])
def test_downsample_bounds_points_and_keeps_ends_and_extremes(n, max_points):
    rng = random.Random(n)
    xs = list(range(n))
    ys = [rng.gauss(0, 1) for _ in xs]
    ys[n // 3] = 50.0  # a spike
    ys[2 * n // 3] = -40.0  # a dip
    out_x, out_y = downsample(xs, ys, max_points)
    assert len(out_x) == len(out_y) <= max_points
    assert (out_x[0], out_y[0]) == (0, ys[0])
    assert (out_x[-1], out_y[-1]) == (n - 1, ys[-1])
    assert (n // 3, 50.0) in zip(out_x, out_y) and (2 * n // 3, -40.0) in zip(out_x, out_y)
    assert out_x == sorted(out_x)
    assert all(ys[x] == y for x, y in zip(out_x, out_y))  # real points, not averages


def test_downsample_leaves_short_series_alone_and_drops_non_numbers():
    assert downsample([1, 2, 3], [0.5, 0.25, 0.125], 500) == ([1, 2, 3], [0.5, 0.25, 0.125])
    assert downsample([1, 2, 3, 4], [1.0, None, float("nan"), 2.0], 500) == ([1, 4], [1.0, 2.0])
    with pytest.raises(ValueError):
        downsample([1, 2, 3], [1, 2, 3], 1)


def test_ema_equals_the_weighted_average_it_stands_for():
    values = [3.0, 2.5, 2.7, 1.9, 2.2, 1.4, 1.6, 1.1]
    for smoothing in (0.0, 0.6, 0.9):
        assert ema(values, smoothing) == pytest.approx(closed_form_ema(values, smoothing))
    assert ema(values, 0.0) == pytest.approx(values)


# --------------------------------------------------------------------------- loss


def test_loss_figure_has_raw_smoothed_and_eval_traces():
    events = training_events(40, eval_every=10)
    events.insert(5, {"event": "log", "step": 6, "learning_rate": 1e-4})  # a log event without loss
    fig = loss_figure(events, smoothing=0.8)

    losses = [e["loss"] for e in events if "loss" in e]
    assert list(trace(fig, "train loss").x) == list(range(1, 41))
    assert list(trace(fig, "train loss").y) == losses
    assert list(trace(fig, "train loss (EMA)").y) == pytest.approx(closed_form_ema(losses, 0.8))
    evals = trace(fig, "eval loss")
    assert list(evals.x) == [10, 20, 30, 40]
    assert list(evals.y) == pytest.approx([1.5 / math.sqrt(s) for s in (10, 20, 30, 40)])
    assert "markers" in evals.mode
    assert fig.layout.uirevision == "loss"


def test_long_runs_are_downsampled_after_smoothing():
    events = training_events(20_000, eval_every=1000)
    fig = loss_figure(events, smoothing=0.9)
    losses = [e["loss"] for e in events if "loss" in e]
    raw, smooth = trace(fig, "train loss"), trace(fig, "train loss (EMA)")
    assert len(raw.x) <= MAX_POINTS and len(smooth.x) <= MAX_POINTS
    assert max(raw.y) == max(losses) and min(raw.y) == min(losses)
    assert smooth.y[-1] == pytest.approx(closed_form_ema(losses[-200:], 0.9)[-1], rel=1e-6)
    assert len(fig.to_json()) < 100_000  # what gr.Plot resends on each tick


def test_several_runs_overlay_with_one_colour_each():
    fig = loss_figure({"r8": training_events(30, seed=1), "r16": training_events(50, seed=2)})
    a, b = trace(fig, "r8 · train loss (EMA)"), trace(fig, "r16 · train loss (EMA)")
    assert len(a.x) == 30 and len(b.x) == 50
    assert a.line.color != b.line.color
    assert trace(fig, "r8 · eval loss").line.color == a.line.color

    # The current run as a list plus others to compare with.
    mixed = loss_figure(training_events(20), runs={"baseline": training_events(20, seed=3)})
    assert {"train loss (EMA)", "baseline · train loss (EMA)"} <= {t.name for t in mixed.data}


def task_events(scores: list[float], every: int = 10, metric: str = "json_equal") -> list[dict]:
    """What the task evaluation writes: one task_eval event per evaluation, the base first at step 0."""
    return [{"event": "task_eval", "step": i * every, "metric": metric, "score": score, "n": 50, "seconds": 1.0}
            for i, score in enumerate(scores)]


def test_task_score_is_drawn_on_its_own_right_axis():
    fig = loss_figure(training_events(40) + task_events([0.0, 0.3, 0.8, 0.95, 0.97]))
    scores = trace(fig, "json_equal (right axis)")
    assert list(scores.x) == [0, 10, 20, 30, 40] and list(scores.y) == [0.0, 0.3, 0.8, 0.95, 0.97]
    assert scores.yaxis == "y2" and tuple(fig.layout.yaxis2.range) == (0, 1.02)  # fixed: no jumping on refresh
    assert fig.layout.yaxis2.overlaying == "y" and "task score" in fig.layout.title.text
    assert trace(fig, "eval loss").yaxis in (None, "y")  # losses stay on the left axis
    assert scores.line.color != trace(fig, "train loss (EMA)").line.color  # one run: a colour per quantity

    without = loss_figure(training_events(40))
    assert "yaxis2" not in without.to_plotly_json()["layout"] and without.layout.title.text == "Loss"
    only_scores = loss_figure(task_events([0.1]))  # the base's score arrives before any loss line
    assert [t.name for t in only_scores.data] == ["json_equal (right axis)"]


def test_task_scores_overlay_per_run_in_the_run_colour():
    fig = loss_figure({"a": training_events(20) + task_events([0.0, 0.5, 0.9]),
                       "b": training_events(20, seed=2) + task_events([0.0, 0.2], metric="exact_match")})
    assert trace(fig, "a · json_equal (right axis)").line.color == trace(fig, "a · train loss (EMA)").line.color
    assert trace(fig, "b · exact_match (right axis)").line.color == trace(fig, "b · train loss (EMA)").line.color
    many = loss_figure(training_events(50) + task_events([i / 2000 for i in range(2000)], every=1))
    assert len(trace(many, "json_equal (right axis)").x) <= MAX_POINTS  # bounded payload


@pytest.mark.parametrize("build", [loss_figure, lr_gradnorm_figure, throughput_figure])
@pytest.mark.parametrize("metrics", [[], None, [{"event": "log", "step": 1}], {"empty-run": []}])
def test_no_metrics_gives_a_readable_empty_figure(build, metrics):
    fig = build(metrics)
    assert fig.data == ()
    assert [a.text for a in fig.layout.annotations] == ["No metrics yet"]
    assert fig.layout.uirevision


# --------------------------------------------------------------------------- lr, grad norm, throughput


def test_lr_and_grad_norm_use_two_axes():
    events = training_events(25)
    fig = lr_gradnorm_figure(events)
    lr, norm = trace(fig, "learning rate"), trace(fig, "grad norm")
    assert list(lr.y) == [e["learning_rate"] for e in events if "learning_rate" in e]
    assert list(norm.y) == [e["grad_norm"] for e in events if "grad_norm" in e]
    assert (lr.yaxis, norm.yaxis) == ("y", "y2")
    assert fig.layout.yaxis2.overlaying == "y" and fig.layout.yaxis2.side == "right"


def test_throughput_figure_plots_tokens_per_second_by_step():
    events = training_events(15)
    fig = throughput_figure(events)
    assert list(trace(fig, "tokens/s").x) == list(range(1, 16))
    assert list(trace(fig, "tokens/s").y) == [
        e["tokens_per_second"] for e in events if "tokens_per_second" in e
    ]
    assert fig.layout.uirevision == "throughput"


# --------------------------------------------------------------------------- memory


def nvml_samples(n: int, start: float = 1_700_000_000.0) -> list[dict]:
    samples = []
    for i in range(n):
        process = (1 + i % 7) * GIB
        samples.append(
            {
                "t": start + i,
                "source": "nvml",
                "process_bytes": process,
                "error": None,
                "devices": [
                    {"index": 0, "name": "A100", "used_bytes": process + GIB, "total_bytes": 80 * GIB},
                    {"index": 1, "name": "A100", "used_bytes": GIB // 2, "total_bytes": 80 * GIB},
                ],
            }
        )
    return samples


def test_memory_figure_shows_each_gpu_the_process_and_the_predicted_peak():
    samples = nvml_samples(30)
    fig = memory_figure(samples, predicted_peak_bytes=int(9.5 * GIB))

    assert fig.layout.title.text == "GPU memory"
    assert fig.layout.yaxis.title.text == "VRAM (GiB)"
    assert list(trace(fig, "GPU 0 used").y) == pytest.approx(
        [d["devices"][0]["used_bytes"] / GIB for d in samples]
    )
    assert set(trace(fig, "GPU 1 total").y) == {80.0}
    assert list(trace(fig, "training process (all GPUs)").y) == pytest.approx(
        [s["process_bytes"] / GIB for s in samples]
    )
    (peak,) = fig.layout.shapes
    assert [a.text for a in fig.layout.annotations] == ["predicted peak 9.50 GiB"]
    assert peak.line.dash == "dash" and peak.y0 == peak.y1 == pytest.approx(9.5)
    assert fig.layout.uirevision == "memory"


def test_memory_without_nvidia_gpu_is_titled_as_ram_not_vram():
    samples = [
        {
            "t": 1_700_000_000.0 + i,
            "source": "process_rss",
            "devices": [],
            "process_bytes": (200 + i) * 2**20,
            "error": None,
        }
        for i in range(10)
    ]
    fig = memory_figure(samples)
    assert fig.layout.title.text == RSS_TITLE == "Training process RAM (no NVIDIA GPU) — not VRAM"
    assert fig.layout.yaxis.title.text == "RAM (GiB)"
    assert [t.name for t in fig.data] == ["training process RAM"]
    assert fig.layout.shapes == ()  # no predicted peak given
    with_peak = memory_figure(samples, predicted_peak_bytes=GIB)
    assert [a.text for a in with_peak.layout.annotations] == [
        "predicted VRAM peak 1.00 GiB"
    ]  # still a GPU figure


def test_failed_readings_are_marked_and_long_histories_bounded():
    samples = nvml_samples(20_000)
    samples[500] = {
        "t": samples[500]["t"],
        "source": "nvml",
        "devices": [],
        "process_bytes": None,
        "error": "device count: GPU is lost",
    }
    fig = memory_figure(samples)
    assert list(trace(fig, "reading failed").text) == ["device count: GPU is lost"]
    assert all(len(t.x) <= MAX_POINTS for t in fig.data)
    assert max(trace(fig, "GPU 0 used").y) == pytest.approx(8.0)
    assert len(fig.to_json()) < 200_000


def test_runs_compare_by_time_since_each_start():
    gpu_run = nvml_samples(40, start=1_000.0)
    cpu_run = [
        {"t": 5_000.0 + 2 * i, "source": "process_rss", "devices": [], "process_bytes": GIB, "error": None}
        for i in range(10)
    ]
    fig = memory_figure([], predicted_peak_bytes=4 * GIB, runs={"qlora-r8": gpu_run, "cpu": cpu_run})

    gpu, cpu = trace(fig, "qlora-r8 (VRAM)"), trace(fig, "cpu (RAM)")
    assert list(gpu.x) == list(range(40)) and list(cpu.x) == list(range(0, 20, 2))
    assert list(gpu.y) == pytest.approx([s["process_bytes"] / GIB for s in gpu_run])
    assert "not VRAM" in fig.layout.title.text
    assert fig.layout.shapes[0].y0 == pytest.approx(4.0)

    only_cpu = memory_figure(cpu_run, runs={"other": cpu_run})
    assert only_cpu.layout.title.text.startswith(RSS_TITLE)
    assert {t.name for t in only_cpu.data} == {"this run (RAM)", "other (RAM)"}


def test_runs_without_a_process_share_fall_back_to_device_use():
    run = nvml_samples(5)
    for sample in run:
        sample["process_bytes"] = None  # e.g. NVML reporting host PIDs inside a container
    fig = memory_figure(None, runs={"docker": run})
    assert list(trace(fig, "docker (device VRAM used)").y) == pytest.approx(
        [sum(d["used_bytes"] for d in s["devices"]) / GIB for s in run]
    )


@pytest.mark.parametrize("samples", [[], None])
def test_no_samples_gives_an_empty_memory_figure(samples):
    fig = memory_figure(samples, predicted_peak_bytes=GIB)
    assert fig.data == () and [a.text for a in fig.layout.annotations] == ["No memory samples yet"]


def test_charts_do_not_import_gradio_or_torch():
    code = "import sys, ui.charts; bad = {'gradio', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
