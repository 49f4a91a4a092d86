"""Experiment trackers a run can report to through transformers' own integrations (``report_to``).

This module owns what the config and the runtime decision need to know about them: their
names (the choices of ``train.report_to``), the module transformers imports for each, the
pip requirement that installs it, and whether W&B can reach its server. Where each tracker
writes inside a run directory, and the command that opens it, live with the worker in
``engine.training.trackers``. The trackers are optional installs (requirements-trackers.txt):
choosing one that is missing is a fallback sentence, never a failed run.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class Tracker:
    name: str  # transformers' report_to name
    label: str
    module: str  # what transformers' integration imports (its is_<name>_available checks this module)
    requirement: str  # what pip installs


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", "TensorBoard", "tensorboard", "tensorboard"),
    "trackio": Tracker("trackio", "Trackio", "trackio", "trackio"),
    # mlflow-skinny is the tracking client alone (about 90 MB instead of about 600 MB for mlflow with its
    # server and data-science dependencies); `mlflow ui` needs the full package.
    "mlflow": Tracker("mlflow", "MLflow", "mlflow", "mlflow-skinny"),
    "wandb": Tracker("wandb", "Weights & Biases", "wandb", "wandb"),
}
NONE = "none"
REPORT_TO_CHOICES = (NONE, *TRACKERS)


def installed(name: str) -> bool:
    """Whether the tracker's package can be found (the same test transformers' integrations make)."""
    try:
        return importlib.util.find_spec(TRACKERS[name].module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return False


def pip_command(*requirements: str) -> str:
    """``pip install ...`` for the Python that runs LoRA Lab (the project's .venv when there is one)."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(Path.cwd()))
    except ValueError:
        shown = str(python)
    return f"{shown} -m pip install {' '.join(requirements)}"


def missing_sentence(name: str) -> str:
    tracker = TRACKERS[name]
    return (f"{tracker.label} is not installed, so this run does not report to it (the run directory still has "
            f"every metric): install it with `{pip_command(tracker.requirement)}`, or every tracker with "
            f"`{pip_command('-r requirements-trackers.txt')}`.")


WANDB_HOST_DEFAULT = "https://api.wandb.ai"


def wandb_offline_reason(timeout: float = 2.0) -> str | None:
    """Why W&B must log offline here (no key, or its server out of reach), or None when it can go online.

    ``WANDB_MODE`` set by the person wins and is not second-guessed (None). Without a key W&B
    would ask for one on a terminal the worker does not have; without a network it would retry
    for minutes. A short TCP connect decides the second, as engine.hub does for the Hugging Face hub.
    """
    if os.environ.get("WANDB_MODE"):
        return None
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(urlparse(_wandb_base_url()).hostname or "")):
        return "no W&B API key is set (WANDB_API_KEY or `wandb login`)"
    parsed = urlparse(_wandb_base_url())
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return None
    except OSError:
        return f"{parsed.hostname} cannot be reached"


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", WANDB_HOST_DEFAULT)


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
