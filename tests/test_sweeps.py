"""Sweeps (expansion, refusal, Pareto, recommendation, a real queue with a restart and a stop), the overfitting
alarm on a synthetic stream, and early stopping that keeps the best checkpoint."""

from __future__ import annotations

import os
import signal

import pytest

from engine.config import load_preset
from engine.errors import ConfigError
from engine.sweeps import expand, pareto_front, parse_vary, read_results, read_sweep, recommendation, stop_sweep
from engine.sweeps.runner import start_sweep, sweep_states
from engine.sweeps.summary import RunResult
from engine.training import rundir
from engine.training.jobs import JobManager, wait_for_state
from engine.training.overfit import alarm_settings, overfit_alarm
from tests.conftest import wait_until

TINY = ["train.max_steps=6", "train.logging_steps=1", "train.eval_steps=3", "train.save_steps=3",
        "train.per_device_train_batch_size=8", "eval.num_samples=4", "eval.max_new_tokens=16"]


# ----------------------------------------------------------------------------- expansion and refusal
def test_vary_values_split_on_commas_or_bars():
    assert parse_vary("lora.r=4, 8,16").values == ["4", "8", "16"]
    vary = parse_vary("lora.target_modules=q_proj,v_proj | all-linear")
    assert vary.values == ["q_proj,v_proj", "all-linear"] and vary.short == "target_modules"
    with pytest.raises(ConfigError, match="did you mean 'lora.r'"):
        parse_vary("lora.rank=4,8")
    with pytest.raises(ConfigError, match="at least two"):
        parse_vary("lora.r=4")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_vary("lora.r=4,8,4")
    with pytest.raises(ConfigError, match="must look like"):
        parse_vary("lora.r")


def test_expand_makes_validated_configs_with_predicted_peaks():
    plan = expand("demo-lora", ["lora.target_modules=q_proj,v_proj | all-linear", "method=lora|qlora"],
                  ["train.max_steps=7"])
    assert len(plan.runs) == 4
    first = plan.runs[0]
    assert first.values == {"lora.target_modules": "q_proj,v_proj", "method": "lora"}
    assert first.config.lora.target_modules == ["q_proj", "v_proj"] and first.config.method == "lora"
    assert plan.runs[3].config.lora.target_modules == "all-linear" and plan.runs[3].config.method == "qlora"
    assert all(run.config.train.max_steps == 7 for run in plan.runs)
    assert first.label == "target_modules=q_proj,v_proj, method=lora"
    # The memory estimator's prediction (its one owner): all-linear adapts more modules than q_proj,v_proj.
    assert all(run.predicted_peak_bytes for run in plan.runs)
    assert plan.runs[2].predicted_peak_bytes > plan.runs[0].predicted_peak_bytes


def test_a_value_the_config_refuses_is_named_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError) as caught:
        expand("demo-lora", ["lora.r=8,0"])
    assert str(caught.value) == "lora.r: the sweep value lora.r=0 is refused: rank must be a positive integer, got 0."
    with pytest.raises(ConfigError, match="train.learning_rate=3 is refused"):
        expand("demo-lora", ["lora.r=4,8", "train.learning_rate=1e-4,3"])
    with pytest.raises(ConfigError, match="both varied and set"):
        expand("demo-lora", ["lora.r=4,8"], ["lora.r=2"])
    with pytest.raises(ConfigError, match="at most"):
        expand("demo-lora", ["lora.r=1,2,3,4,5", "train.seed=1,2,3,4"])


# ----------------------------------------------------------------------------- Pareto and the sentence
def result(label, loss, memory_mib, wall_s):
    return RunResult(name=f"run-{label}", label=label, values={}, status="completed", final_eval_loss=loss,
                     peak_memory_bytes=None if memory_mib is None else memory_mib * 2**20, wall_time_s=wall_s)


def test_pareto_front_keeps_the_non_dominated_runs():
    runs = [result("r=2", 1.30, 500, 50), result("r=8", 1.01, 620, 60), result("r=32", 1.00, 1000, 90),
            result("r=16", 1.05, 800, 55), result("r=64", None, 1200, 95)]
    front = pareto_front(runs, "peak_memory_bytes")
    assert [r.label for r in front] == ["r=2", "r=8", "r=32"]  # r=16 is dominated by r=8; r=64 has no loss
    assert [r.label for r in pareto_front(runs, "wall_time_s")] == ["r=2", "r=16", "r=8", "r=32"]
    assert pareto_front([], "wall_time_s") == []


def test_recommendation_names_the_cheap_run_near_the_best():
    runs = [result("r=2", 1.30, 500, 50), result("r=8", 1.005, 620, 60), result("r=32", 1.00, 1000, 90)]
    assert recommendation(runs) == ("r=8 is within 0.5% of the best eval loss (1.0050 against 1.0000 for r=32) "
                                    "at 38% less memory than r=32.")
    alone = [result("r=2", 1.30, 500, 50), result("r=32", 1.00, 1000, 90)]
    assert recommendation(alone) == ("r=32 has the best eval loss (1.0000), and no run within 1% of it uses less "
                                     "memory or wall time (1 other run compared).")
    # No near-best run saves memory (a noisy measurement), but one saves wall time: that is the reason given.
    by_time = [result("steps=80", 1.00, 900, 90), result("steps=60", 1.004, 905, 70), result("steps=20", 1.5, 880, 30)]
    assert recommendation(by_time) == ("steps=60 is within 0.4% of the best eval loss (1.0040 against 1.0000 for "
                                       "steps=80) at 22% less wall time than steps=80.")
    no_memory = [result("r=8", 1.005, None, 60), result("r=32", 1.00, None, 90)]
    assert "less wall time than r=32" in recommendation(no_memory)
    assert recommendation([result("r=8", None, 600, 10)]).startswith("No run has an eval loss yet")


# ----------------------------------------------------------------------------- the overfitting alarm
def stream(eval_losses: dict[int, float], train_losses: dict[int, float], scores: dict[int, float] | None = None):
    records = [{"event": "log", "step": s, "loss": v} for s, v in train_losses.items()]
    records += [{"event": "eval", "step": s, "eval_loss": v} for s, v in eval_losses.items()]
    records += [{"event": "task_eval", "step": s, "metric": "json_equal", "score": v}
                for s, v in (scores or {}).items()]
    return sorted(records, key=lambda r: (r["step"], r["event"] != "log"))


FALLING_TRAIN = {step: 2.0 - step / 100 for step in range(1, 101)}


def test_alarm_fires_when_eval_loss_worsens_while_train_loss_falls():
    evals = {0: 2.5, 10: 1.6, 20: 1.4, 30: 1.45, 40: 1.5, 50: 1.6}
    alarm = overfit_alarm(stream(evals, FALLING_TRAIN), patience=3, checkpoint_steps=[20, 50])
    assert alarm is not None
    assert (alarm.began_step, alarm.best_step, alarm.best_value, alarm.worsened) == (30, 20, 1.4, 3)
    assert alarm.best_checkpoint == "checkpoint-20"
    assert alarm.train_loss_after < alarm.train_loss_before
    assert "from step 30" in alarm.sentence and "saved as checkpoint-20" in alarm.sentence
    assert alarm.cell == "from step 30 (best 20)"
    # Two worse evaluations are not yet three; a new best clears it; a flat training loss is not overfitting.
    assert overfit_alarm(stream({k: v for k, v in evals.items() if k <= 40}, FALLING_TRAIN), patience=3) is None
    assert overfit_alarm(stream({**evals, 60: 1.3}, FALLING_TRAIN), patience=3) is None
    flat_then_up = {step: (2.0 - step / 100 if step <= 20 else 1.8 + step / 100) for step in range(1, 101)}
    assert overfit_alarm(stream(evals, flat_then_up), patience=3) is None
    assert overfit_alarm(stream(evals, FALLING_TRAIN), patience=3, checkpoint_steps=[50]).best_checkpoint is None


def test_alarm_on_a_task_score_where_higher_is_better():
    scores = {10: 0.5, 20: 0.7, 30: 0.6, 40: 0.55}
    records = stream({}, FALLING_TRAIN, scores)
    alarm = overfit_alarm(records, patience=2, metric="task_score", greater_is_better=True)
    assert alarm is not None and alarm.metric == "json_equal" and (alarm.began_step, alarm.best_step) == (30, 20)
    assert overfit_alarm(records, patience=2, metric="task_score", greater_is_better=False) is None
    assert alarm_settings({"train": {"early_stopping_patience": 2, "early_stopping_metric": "task_score"},
                           "eval": {"metric": "json_equal"}}) == (2, "task_score", True)
    assert alarm_settings({"train": "damaged"}) == (3, "eval_loss", False)


def test_early_stopping_fields_are_checked_and_built_only_in_build():
    from engine.config.build import early_stopping_arguments, save_steps_for

    config = load_preset("demo-lora", ["train.early_stopping_patience=2", "train.eval_steps=4",
                                       "train.save_steps=6"]).validate()
    assert early_stopping_arguments(config, has_eval=True) == {
        "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
        "greater_is_better": False}
    assert save_steps_for(config, True) == 4 and save_steps_for(config, False) == 6
    assert early_stopping_arguments(config, has_eval=False) == {}
    with pytest.raises(ConfigError, match="task_score needs a task metric"):
        load_preset("demo-lora", ["eval.metric=none", "train.early_stopping_metric=task_score"]).validate()
    with pytest.raises(ConfigError, match="early stopping compares evaluations"):
        load_preset("demo-lora", ["data.eval_path=null", "data.eval_fraction=0", "eval.metric=none",
                                  "train.early_stopping_patience=2"]).validate()


# ----------------------------------------------------------------------------- stopping a queued sweep (no training)
def test_stopping_a_sweep_drops_its_queued_runs_everywhere(tmp_path):
    runs_dir, sweeps_dir = tmp_path / "runs", tmp_path / "sweeps"
    sweep_dir = start_sweep(expand("demo-lora", ["lora.r=2,8"], predict=False), runs_dir, sweeps_dir,
                            sweep_id="sw-queued")
    sweep = read_sweep(sweep_dir)
    names = [entry["name"] for entry in sweep["runs"]]
    assert names == ["sw-queued-r2", "sw-queued-r8"]
    assert all(rundir.read_run_status(runs_dir / name).sweep == "sw-queued" for name in names)
    assert rundir.load_config(runs_dir / names[0]).description.startswith("sweep sw-queued: r=2")
    jobs = JobManager(runs_dir, recover=True)  # a restarted dashboard queues them again (and starts nothing yet)
    other = JobManager(runs_dir, recover=True)  # a second manager sharing the folder, that is not told
    assert jobs.queue_names() == names == other.queue_names()
    message = stop_sweep(sweep_dir, runs_dir, jobs=jobs)
    assert message == "Sweep sw-queued stopped: 2 queued runs dropped (sw-queued-r2, sw-queued-r8)."
    assert jobs.queue_names() == []
    for name in names:
        status = rundir.read_run_status(runs_dir / name)
        assert status.state == "stopped" and status.message == "Removed from the queue: sweep sw-queued was stopped."
    other.poll()  # it pops them, sees they are no longer queued, and starts nothing
    assert other.active is None and other.queue_names() == []
    assert sweep_states(read_sweep(sweep_dir), runs_dir) == ["stopped", "stopped"]
    assert JobManager(runs_dir).queue_names() == []
    # The dashboard names sweeps by id only; a command line may give the folder.
    from engine.errors import RunError
    from engine.sweeps import resolve_sweep

    assert resolve_sweep(sweeps_dir, "sw-queued") == sweep_dir
    assert resolve_sweep(tmp_path, str(sweep_dir), allow_path=True) == sweep_dir
    with pytest.raises(RunError, match="not a valid sweep name"):
        resolve_sweep(tmp_path, str(sweep_dir))
    with pytest.raises(RunError, match="No sweep named 'nope'.*sweeps there: sw-queued"):
        resolve_sweep(sweeps_dir, "nope")


# ----------------------------------------------------------------------------- real runs
@pytest.fixture()
def managers(tmp_path, demo_model_dir):
    made = []

    def make():
        jobs = JobManager(tmp_path / "runs", poll_s=0.2).start()
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        jobs.shutdown()
    for summary in rundir.list_runs(tmp_path / "runs"):
        pid = rundir.live_worker_pid(summary.path, rundir.read_run_status(summary.path, derive=False).pid)
        if pid:
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_real_2x2_sweep_survives_a_dashboard_restart_and_stops(tmp_path, managers):
    runs_dir, sweeps_dir = tmp_path / "runs", tmp_path / "sweeps"
    first = managers()
    plan = expand("demo-lora", ["lora.r=2,16", "train.learning_rate=2e-3,5e-3"], TINY)
    sweep_dir = start_sweep(plan, runs_dir, sweeps_dir, enqueue=first.enqueue, sweep_id="sw")
    sweep = read_sweep(sweep_dir)
    assert sweep["base_config"]["train"]["max_steps"] == 6 and sweep["vary"][1]["values"] == ["2e-3", "5e-3"]
    names = [entry["name"] for entry in sweep["runs"]]
    assert names == ["sw-r2-learning_rate2e-3", "sw-r2-learning_rate5e-3", "sw-r16-learning_rate2e-3",
                     "sw-r16-learning_rate5e-3"]
    one, two, three, four = (runs_dir / name for name in names)
    assert first.active_name() == one.name and first.queue_names() == names[1:]

    # The dashboard restarts while the first run trains: the new manager adopts it and queues the rest.
    assert wait_until(lambda: rundir.read_run_status(one).state == "training", 300), rundir.log_tail(one)
    first.shutdown()
    second = managers()
    assert second.active_name() == one.name and second.queue_names() == names[1:]
    assert wait_for_state(three, {"completed", "failed", "stopped"}, 600) == "completed", rundir.log_tail(three)
    assert [rundir.read_run_status(run).state for run in (one, two)] == ["completed", "completed"]

    # Stopping the sweep stops the live fourth run (gracefully) and says so.
    assert wait_until(lambda: rundir.read_run_status(four).state == "training", 300), rundir.log_tail(four)
    message = stop_sweep(sweep_dir, runs_dir, jobs=second)
    assert message == (f"Sweep sw stopped: run {four.name} was asked to stop (it finishes its step and saves its "
                       "adapter and a checkpoint); 3 had already ended.")
    assert wait_for_state(four, {"completed", "stopped", "failed"}, 120) in ("stopped", "completed")

    results = read_results(read_sweep(sweep_dir), runs_dir)
    assert [r.label for r in results] == ["r=2, learning_rate=2e-3", "r=2, learning_rate=5e-3",
                                          "r=16, learning_rate=2e-3", "r=16, learning_rate=5e-3"]
    done = results[:3]
    for item in done:
        assert item.status == "completed" and item.final_eval_loss is not None and item.best_step in (3, 6)
        assert item.peak_memory_bytes and item.tokens_per_second and item.wall_time_s and item.adapter_bytes
        assert item.predicted_peak_bytes and item.task_metric == "json_equal"
    assert done[2].adapter_bytes > done[0].adapter_bytes  # rank 16 stores 8x the adapter weights of rank 2
    assert pareto_front(results, "peak_memory_bytes")  # at least the best run is on the front
    assert recommendation(results).startswith("r=")

    # The Sweeps tab's view of the same folder: a row per value, curves per value, both Pareto charts.
    from ui.context import AppContext
    from ui.sweep_tab import view

    header, rows, loss, memory, wall, sentence = view(
        AppContext(runs_dir=runs_dir, exports_dir=tmp_path / "exports", sweeps_dir=sweeps_dir), "sw")
    assert "(stopped)" in header and [row[1] for row in rows] == [r.label for r in results]
    assert {trace.legendgroup for trace in loss.data} >= {r.label for r in done}
    assert memory.data and wall.data and sentence == recommendation(results)


@pytest.mark.slow
def test_the_demo_overfits_the_alarm_fires_and_early_stopping_keeps_the_best_checkpoint(tmp_path, demo_model_dir):
    """presets/demo-overfit.yaml for real: 8 rows memorised, the eval loss turns up while the training loss falls.
    With a patience of 3, transformers' EarlyStoppingCallback ends the run 3 evaluations after the best one, the
    adapter is the best checkpoint's, the status says so, and the runs table raises the overfitting alarm."""
    from safetensors.torch import load_file

    from tests.conftest import run_preset_to_end

    run_dir = run_preset_to_end(tmp_path / "runs", "demo-overfit", [
        "train.early_stopping_patience=3", "train.save_steps=15"], name="overfit")
    status = rundir.read_run_status(run_dir)
    assert status.state == "completed", rundir.log_tail(run_dir)
    evals = [(m["step"], m["eval_loss"]) for m in rundir.read_metrics(run_dir)
             if m.get("eval_loss") is not None and m["step"] > 0]
    best_step = min(evals, key=lambda item: item[1])[0]
    assert evals[-1][0] == best_step + 30 < 120  # three evaluations (every 10 steps) without a better one
    assert status.step == evals[-1][0] and status.kept_step == best_step
    assert status.message == (f"Stopped early at step {status.step}: eval_loss had not improved for 3 evaluations. "
                              f"Kept the best checkpoint, step {best_step} (eval_loss "
                              f"{min(loss for _, loss in evals):.4f}); adapter saved from it.")
    assert any("saved at every evaluation" in sentence for sentence in status.fallbacks)  # 15 is not a multiple of 10
    kept = load_file(run_dir / "checkpoints" / f"checkpoint-{best_step}" / "model.safetensors")
    saved = load_file(run_dir / "adapter" / "model.safetensors")
    assert kept.keys() == saved.keys() and all((kept[k] == saved[k]).all() for k in kept)

    alarm = rundir.summarize_run(run_dir).overfit
    assert alarm is not None and alarm.best_step == best_step and alarm.began_step == best_step + 10
    assert alarm.best_checkpoint == f"checkpoint-{best_step}" and alarm.train_loss_after < alarm.train_loss_before
    assert rundir.summarize_run(run_dir).as_row()["overfitting"] == f"from step {best_step + 10} (best {best_step})"
    from ui.context import AppContext
    from ui.train_tab import status_html

    page = status_html(run_dir, AppContext(runs_dir=run_dir.parent, exports_dir=tmp_path / "exports"), alarm=alarm)
    assert "id='loralab-overfit'" in page and f"from step {best_step + 10}" in page


# ----------------------------------------------------------------------------- the Sweeps tab and its charts
def test_sweep_tab_previews_runs_and_refuses_in_words():
    from ui.sweep_tab import plan_preview

    text, rows, columns = plan_preview("demo-lora", "lora.r", "2, 8, 32", "", "", "train.max_steps=10")
    assert text.startswith("**3 runs**") and "predicted peak" in text
    assert columns == ["lora.r", "predicted peak (MiB)"] and [row[0] for row in rows] == ["2", "8", "32"]
    assert all(isinstance(row[1], int) and row[1] > 0 for row in rows)
    text, rows, _ = plan_preview("demo-lora", "lora.lora_dropout", "0.1, 1.5", "", "", "")
    assert text.startswith("**Refused:**") and "lora.lora_dropout=1.5 is refused" in text and rows == []
    text, rows, columns = plan_preview("demo-lora", "lora.r", "4,8", "method", "lora | qlora", "lora.r=16")
    assert len(rows) == 4 and columns[:2] == ["lora.r", "method"]  # the --set line of a varied field is ignored


def test_the_train_form_becomes_the_sweeps_base():
    from engine.config import load_preset
    from ui.sweep_tab import from_train_form
    from ui.train_tab import FIELD_NAMES, config_to_values

    config = load_preset("demo-lora", ["train.max_steps=7", "lora.lora_dropout=0.1"])
    preset, overrides = from_train_form("demo-lora", "qlora", *config_to_values(config))
    assert preset == "demo-lora" and set(overrides.splitlines()) >= {"train.max_steps=7", "lora.lora_dropout=0.1"}
    assert "quant.load_in_4bit=true" in overrides.splitlines()
    values = dict(zip(FIELD_NAMES, config_to_values(config)), **{"lora.r": -3})
    assert "rank must be a positive integer" in from_train_form("demo-lora", "lora", *values.values())[1]


def test_pareto_chart_marks_the_front_and_loss_chart_colours_by_value():
    from ui.charts import pareto_figure, sweep_loss_figure

    points = [{"label": "r=2", "quality": 1.3, "cost": 500, "front": True},
              {"label": "r=16", "quality": 1.05, "cost": 800, "front": False},
              {"label": "r=8", "quality": 1.0, "cost": 620, "front": True}]
    fig = pareto_figure(points, "peak memory (MiB)")
    front = [trace for trace in fig.data if trace.name.startswith("Pareto")][0]
    assert list(front.text) == ["r=2", "r=8"] and list(front.x) == [500, 620]
    assert [trace.name for trace in fig.data if trace.name == "dominated"] == ["dominated"]
    blank = pareto_figure([{"label": "x", "quality": None, "cost": 1}], "wall")
    assert "No finished run" in blank.layout.annotations[0].text
    curves = {"r=2": [{"event": "log", "step": 1, "loss": 2.0}, {"event": "eval", "step": 2, "eval_loss": 1.9}],
              "r=8": [{"event": "log", "step": 1, "loss": 1.8}]}
    fig = sweep_loss_figure(curves)
    colours = {trace.legendgroup: trace.line.color for trace in fig.data}
    assert set(colours) == {"r=2", "r=8"} and colours["r=2"] != colours["r=8"]
