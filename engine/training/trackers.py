"""Experiment trackers inside the run directory: where each writes, how to open it, and a guard.

transformers' own integrations do the reporting (``SFTConfig.report_to``, built in
engine.config.build); they read where to write from environment variables, which the worker
sets here before the trainer exists: TensorBoard event files in ``<run>/tensorboard``, an
MLflow file store in ``<run>/mlruns``, Trackio's local database in ``<run>/trackio``, W&B in
``<run>/wandb`` (offline when there is no key or network). A variable the person already set
wins (an MLflow server, say). ``trackers.json`` records where the copies went and the command
that opens each, for the Train tab and ``python -m engine show``.

The run directory stays the single source of truth, so a tracker never fails a run: one that
cannot be imported is dropped before training, and one that raises during training is turned
off for the rest of it; both become a fallback sentence in the status.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from engine.config.trackers import TRACKERS
from engine.training import rundir

PROJECT = "loralab"  # the project/experiment name each tracker files runs under
SUBFOLDERS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "trackio": "trackio", "wandb": "wandb"}


def tracker_env(run_dir: Path, report_to: list[str], wandb_offline: bool = False) -> dict[str, str]:
    """The environment variables transformers' integrations read, pointing into ``run_dir``.

    Variables already set in the environment are kept (returned unchanged), so a person's
    tracking server or W&B mode wins over these defaults.
    """
    run_dir = Path(run_dir).resolve()
    wanted: dict[str, str] = {}
    if "tensorboard" in report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(run_dir / SUBFOLDERS["tensorboard"])
    if "mlflow" in report_to:
        wanted["MLFLOW_TRACKING_URI"] = (run_dir / SUBFOLDERS["mlflow"]).as_uri()
        wanted["MLFLOW_EXPERIMENT_NAME"] = PROJECT
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless asked. We ask: its
            # SQLite store spends about 10 s creating tables for every run on a slow disk, and puts
            # artifacts under the working folder instead of the run directory.
            wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "trackio" in report_to:
        wanted["TRACKIO_DIR"] = str(run_dir / SUBFOLDERS["trackio"])
    if "wandb" in report_to:
        wanted["WANDB_DIR"] = str(run_dir)  # W&B adds its own wandb/ folder below this
        wanted["WANDB_PROJECT"] = PROJECT
        if wandb_offline:
            wanted["WANDB_MODE"] = "offline"
    return {key: os.environ.get(key) or value for key, value in wanted.items()}


def _shown(path: str | Path) -> str:
    """A path as a person types it: relative to the current folder when inside it, quoted when needed."""
    path = Path(path)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def destinations(run_dir: Path, report_to: list[str], env: dict[str, str]) -> list[dict]:
    """For each tracker: where its copy went and the command that opens it."""
    found = []
    for name in report_to:
        label = TRACKERS[name].label
        if name == "tensorboard":
            where = env["TENSORBOARD_LOGGING_DIR"]
            command = f"tensorboard --logdir {_shown(where)}"
        elif name == "mlflow":
            where = env["MLFLOW_TRACKING_URI"]
            if where.startswith("file:"):
                folder = Path(unquote(urlparse(where).path))
                command = (f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {_shown(folder)}"
                           "  (the browser needs the full package: pip install mlflow)")
            else:
                command = f"open {where} (experiment {env.get('MLFLOW_EXPERIMENT_NAME', PROJECT)})"
        elif name == "trackio":
            where = env["TRACKIO_DIR"]
            command = f"TRACKIO_DIR={_shown(where)} trackio show --project {PROJECT}"
        else:
            folder = Path(env["WANDB_DIR"]) / "wandb"
            if env.get("WANDB_MODE") == "offline":
                where = f"{folder} (offline)"
                command = f"wandb sync {_shown(folder)}/offline-run-*"
            else:
                where = f"W&B project {env.get('WANDB_PROJECT', PROJECT)} (local files in {folder})"
                command = "the run's URL is in train.log (wandb: View run at ...)"
        found.append({"tracker": name, "label": label, "where": where, "open": command})
    return found


def prepare(run_dir: Path, runtime, say: Callable[[str], None]) -> None:
    """Point the chosen trackers into ``run_dir`` and drop any that cannot be imported.

    Runs in the worker before the trainer is built (Trackio reads TRACKIO_DIR when imported).
    ``runtime.report_to`` keeps only the trackers that imported; ``trackers.json`` says where
    each will write.
    """
    import importlib

    env = tracker_env(run_dir, runtime.report_to, runtime.wandb_offline)
    os.environ.update(env)
    for name in list(runtime.report_to):
        try:
            importlib.import_module(TRACKERS[name].module)
        except Exception as error:  # noqa: BLE001 - a broken tracker install must not fail the run
            runtime.report_to.remove(name)
            say(f"{TRACKERS[name].label} could not be imported ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}), so this run does not report to it; "
                "the run directory still has every metric.")
    if runtime.report_to or rundir.RunPaths(run_dir).trackers.exists():
        rundir.write_json_atomic(rundir.RunPaths(run_dir).trackers,
                                 {"trackers": destinations(run_dir, runtime.report_to, env)})


def read_destinations(run_dir: Path) -> list[dict]:
    """What ``trackers.json`` says (empty when the run reports to no tracker)."""
    record = rundir.read_json(rundir.RunPaths(run_dir).trackers, default=None)
    items = record.get("trackers") if isinstance(record, dict) else None
    return [item for item in items or [] if isinstance(item, dict) and item.get("tracker")]


def guard(trainer, say: Callable[[str], None]) -> None:
    """Wrap the trainer's tracker callbacks so that one that raises is switched off, in words.

    transformers calls every callback in the training loop and lets their exceptions end the
    run; a copy of the metrics must not be able to do that.
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    labels = {INTEGRATION_TO_CALLBACK[name]: TRACKERS[name].label for name in TRACKERS
              if name in INTEGRATION_TO_CALLBACK}
    handler = trainer.callback_handler
    handler.callbacks = [_guarded(callback, labels[type(callback)], say) if type(callback) in labels else callback
                         for callback in handler.callbacks]


def _guarded(inner, label: str, say: Callable[[str], None]):
    from transformers import TrainerCallback

    class GuardedTracker(TrainerCallback):
        """Forwards every event to ``inner`` until it raises once; then it is off."""

        def __init__(self):
            self.inner, self.failed = inner, False

        def __repr__(self) -> str:
            return f"GuardedTracker({type(inner).__name__})"

        def forward(self, event: str, *args, **kwargs):
            if self.failed:
                return None
            try:
                return getattr(self.inner, event)(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - see guard(): a tracker never fails the run
                self.failed = True
                first = str(error).splitlines()[0][:300] if str(error) else ""
                say(f"{label} failed during {event} ({type(error).__name__}: {first}) and is off for the rest of "
                    "this run; the run directory still has every metric.")
                return None

    for event in (name for name in dir(TrainerCallback) if name.startswith("on_")):
        setattr(GuardedTracker, event,
                lambda self, *args, _event=event, **kwargs: self.forward(_event, *args, **kwargs))
    return GuardedTracker()
