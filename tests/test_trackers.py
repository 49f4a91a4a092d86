"""Experiment trackers (train.report_to): the field, the runtime decision, the guard, and real runs whose
tracker copies are read back with each tool's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import RunConfig, load_preset
from engine.config import trackers as tracker_registry
from engine.config.build import decide_runtime
from engine.errors import ConfigError
from engine.training import rundir
from engine.training.trackers import destinations, guard, read_destinations, tracker_env

ALL = ["tensorboard", "mlflow", "trackio", "wandb"]


def has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# ----------------------------------------------------------------------------- the field
def test_report_to_reads_lists_commas_and_none_and_names_a_typo():
    config = RunConfig()
    assert config.train.report_to == []
    config.apply_overrides(["train.report_to=tensorboard, mlflow"])
    assert config.train.report_to == ["tensorboard", "mlflow"] and config.errors() == []
    config.apply_overrides(["train.report_to=[trackio]"])
    assert config.train.report_to == ["trackio"]
    for empty in ("none", "", "[none]"):
        config.apply_overrides([f"train.report_to={empty}"])
        assert config.train.report_to == [], empty
    config.apply_overrides(["train.report_to=tensorbord"])
    (error,) = config.errors()
    assert error.field == "train.report_to" and "did you mean 'tensorboard'" in str(error)
    config.apply_overrides(["train.report_to=[none, wandb]"])
    assert "'none' cannot be combined" in str(config.errors()[0])
    config.apply_overrides(["train.report_to=[mlflow, mlflow]"])
    assert "twice" in str(config.errors()[0])
    with pytest.raises(ConfigError, match="train.report_to"):
        load_preset("demo-lora", ["train.report_to=comet_ml"]).validate()


def test_the_train_form_shows_report_to_as_a_multiselect_and_round_trips_it():
    from ui.train_tab import FIELD_NAMES, component_for, config_to_values, form_to_config

    component = component_for("train.report_to", ["tensorboard"])
    assert component.multiselect and "tensorboard" in [c[0] for c in component.choices]
    config = load_preset("demo-lora", ["train.report_to=tensorboard,trackio"])
    values = dict(zip(FIELD_NAMES, config_to_values(config)))
    assert values["train.report_to"] == ["tensorboard", "trackio"]
    again, errors = form_to_config("demo-lora", "lora", *values.values())
    assert errors == [] and again.train.report_to == ["tensorboard", "trackio"]


# ----------------------------------------------------------------------------- the runtime decision
def test_a_chosen_tracker_whose_package_is_missing_is_a_sentence_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # Python's own way to make a package unimportable
    config = load_preset("demo-lora", ["train.report_to=mlflow"])
    runtime = decide_runtime(config, device="cpu")
    assert runtime.report_to == []
    (sentence,) = [s for s in runtime.fallbacks if "MLflow" in s]
    assert "not installed" in sentence and "-m pip install mlflow-skinny" in sentence
    assert "requirements-trackers.txt" in sentence


def test_wandb_goes_offline_without_a_key_or_a_network_and_says_why(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert "no W&B API key" in tracker_registry.wandb_offline_reason()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert "127.0.0.1 cannot be reached" in tracker_registry.wandb_offline_reason(timeout=1)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the person's choice is not second-guessed
    assert tracker_registry.wandb_offline_reason() is None
    monkeypatch.delenv("WANDB_MODE")
    if not has("wandb"):
        pytest.skip("wandb is not installed (requirements-trackers.txt): the sentence part is checked above")
    runtime = decide_runtime(load_preset("demo-lora", ["train.report_to=wandb"]), device="cpu")
    assert runtime.report_to == ["wandb"] and runtime.wandb_offline
    assert any("WANDB_MODE=offline" in s and "cannot be reached" in s for s in runtime.fallbacks)
    assert tracker_env(tmp_path, ["wandb"], runtime.wandb_offline)["WANDB_MODE"] == "offline"


def test_tracker_env_points_into_the_run_directory_unless_the_person_chose(monkeypatch, tmp_path):
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR",
                 "WANDB_DIR", "WANDB_MODE", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "my run"
    env = tracker_env(run_dir, ALL)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(run_dir / "tensorboard")
    assert env["MLFLOW_TRACKING_URI"] == (run_dir / "mlruns").as_uri() and env["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert env["TRACKIO_DIR"] == str(run_dir / "trackio") and env["WANDB_DIR"] == str(run_dir)
    assert "WANDB_MODE" not in env
    opened = {item["tracker"]: item["open"] for item in destinations(run_dir, ALL, env)}
    assert opened["tensorboard"] == f"tensorboard --logdir '{run_dir / 'tensorboard'}'"  # quoted: a space
    assert f"--backend-store-uri '{run_dir / 'mlruns'}'" in opened["mlflow"]
    assert opened["trackio"].endswith("trackio show --project loralab")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    env = tracker_env(run_dir, ["mlflow"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000" and "MLFLOW_ALLOW_FILE_STORE" not in env


# ----------------------------------------------------------------------------- the guard
def test_a_tracker_that_raises_during_training_is_switched_off_in_words():
    from transformers import TrainerControl, TrainerState
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import CallbackHandler

    class FullDisk:
        def __init__(self):
            self.calls = 0

        def add_scalar(self, *args):
            self.calls += 1
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    # transformers' own TensorBoard callback, writing through a writer whose disk is full.
    callback = TensorBoardCallback.__new__(TensorBoardCallback)
    callback._SummaryWriter, callback.tb_writer = None, FullDisk()
    handler = CallbackHandler([callback], None, None, None, None)
    said = []
    guard(SimpleNamespace(callback_handler=handler), said.append)
    state, control = TrainerState(), TrainerControl()
    for step in (1, 2, 3):
        state.global_step = step
        assert handler.on_log(SimpleNamespace(), state, control, logs={"loss": 1.0 / step}) is control
    assert callback.tb_writer.calls == 1  # off after the first failure
    (sentence,) = said
    assert sentence.startswith("TensorBoard failed during on_log (OSError") and "No space left" in sentence
    assert "run directory still has every metric" in sentence


# ----------------------------------------------------------------------------- real runs, read back
def losses_by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = rundir.read_metrics(run_dir)
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


@pytest.mark.slow
@pytest.mark.skipif(not has("tensorboard", "mlflow", "trackio", "wandb"),
                    reason="the trackers are optional installs: pip install -r requirements-trackers.txt")
def test_every_tracker_holds_the_losses_of_metrics_jsonl(demo_model_dir, tmp_path, monkeypatch):
    from conftest import run_preset_to_end

    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TRACKIO_DIR", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = run_preset_to_end(tmp_path / "runs", "demo-lora", [
        "train.max_steps=4", "train.logging_steps=1", "train.eval_steps=2", "data.eval_path=",
        "data.eval_fraction=0.02", "train.report_to=[tensorboard,mlflow,trackio,wandb]"], name="tracked")
    status = rundir.read_status(run_dir)
    assert status["state"] == "completed", (status, rundir.log_tail(run_dir, 40))
    losses, evals = losses_by_step(run_dir), losses_by_step(run_dir, "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and 2 in evals and 4 in evals

    # TensorBoard's own event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in events.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-6)

    # MLflow's client on the file store.
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    assert mlflow_run.info.run_name == "tracked" and mlflow_run.info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)

    # Trackio's local store, through its own command line (Trackio numbers its own steps; the
    # trainer's step travels as train/global_step, logged with every record).
    def trackio_values(metric: str) -> list[float]:
        done = subprocess.run([sys.executable, "-m", "trackio.cli", "get", "metric", "--project", "loralab",
                               "--run", "tracked", "--metric", metric, "--json"], capture_output=True, text=True,
                              env={**os.environ, "TRACKIO_DIR": str(run_dir / "trackio")}, timeout=120)
        assert done.returncode == 0, done.stderr
        return [v["value"] for v in json.loads(done.stdout)["values"]]

    assert trackio_values("train/loss") == pytest.approx([losses[s] for s in sorted(losses)])

    # W&B has no reader for offline runs (wandb 0.31 dropped the Python one; `wandb sync` needs its server):
    # the run exists offline, and the status says why and how to upload it.
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0
    assert any("WANDB_MODE=offline" in s and "no W&B API key" in s for s in status["fallbacks"])

    # Where each copy went and the command that opens it: trackers.json, the Train tab's status, `engine show`.
    where = {item["tracker"]: item for item in read_destinations(run_dir)}
    assert set(where) == set(ALL)
    from ui.context import AppContext
    from ui.train_tab import status_html

    page = status_html(run_dir, AppContext(runs_dir=run_dir.parent, exports_dir=tmp_path / "exports"))
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in page and "trackio show --project loralab" in page
    assert "wandb sync" in page and "mlflow ui --backend-store-uri" in page


@pytest.mark.slow
@pytest.mark.skipif(not has("tensorboard", "mlflow"), reason="needs tensorboard and mlflow (requirements-trackers.txt)")
def test_a_tracker_that_fails_never_fails_the_run(demo_model_dir, tmp_path, monkeypatch):
    from conftest import run_preset_to_end

    # A store nobody can write, not even root: MLflow fails when it sets up, at the first training event.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///proc/loralab-mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    run_dir = run_preset_to_end(tmp_path / "runs", "demo-lora", [
        "train.max_steps=2", "train.logging_steps=1", "data.eval_path=", "data.eval_fraction=0", "eval.metric=none",
        "train.report_to=mlflow,tensorboard"], name="tracker-fails")
    status = rundir.read_status(run_dir)
    assert status["state"] == "completed", (status, rundir.log_tail(run_dir, 40))
    (sentence,) = [s for s in status["fallbacks"] if s.startswith("MLflow")]
    assert "failed during on_train_begin" in sentence and "off for the rest of this run" in sentence
    assert sorted(losses_by_step(run_dir)) == [1, 2]  # the run's own record is whole
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the other tracker went on
