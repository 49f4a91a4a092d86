"""Shared fixtures: the offline demo model and one real demo training run per session.

Training is real (tiny model, CPU); the expensive pieces are session-scoped so the
whole suite stays well under 20 minutes on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Device locks (engine.training.devices) are machine-wide by default; a test session keeps its own, so
# suites run side by side on a shared machine do not wait for each other's runs. Workers inherit it.
os.environ.setdefault("LORALAB_LOCK_DIR", tempfile.mkdtemp(prefix="loralab-test-locks-"))

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from engine.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def session_runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def wait_until(predicate, timeout: float, poll: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def run_preset_to_end(runs_dir: Path, preset: str, overrides: list[str] = (), name: str | None = None,
                      timeout: float = 2400) -> Path:
    """Train through the real worker process, exactly as the dashboard does; return the run dir.

    The timeout is a hang guard, not a speed target (about 1 minute on a quiet 2-core machine; a machine
    shared with other test runs can be 15 times slower). bench/ measures speed.
    """
    from engine.config import load_preset
    from engine.training import rundir
    from engine.training.jobs import spawn_worker

    config = load_preset(preset, list(overrides)).validate()
    run_dir = rundir.create_run(runs_dir, config, name=name)
    process = spawn_worker(run_dir)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return run_dir


@pytest.fixture(scope="session")
def demo_lora_run(demo_model_dir, session_runs_dir) -> Path:
    """The demo-lora preset with its defaults, trained once for the whole session."""
    return run_preset_to_end(session_runs_dir, "demo-lora", name="demo-lora-session")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# A test is slow when it trains a model or serves a dashboard: through these fixtures, in these modules, or
# marked by hand. `pytest -m "not slow"` is the inner loop (under 3 minutes); the README's command runs all.
SLOW_FIXTURES = {"demo_lora_run", "chat_run", "dashboard", "app", "client"}
SLOW_MODULES = {"test_training.py", "test_jobs.py", "test_cli.py", "test_app_e2e.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


HOLD_EXPORT_LOCK = """
import sys
from engine.export.lock import export_lock
with export_lock(sys.argv[1], "run 'other' as a merged model"):
    print("held", flush=True)
    sys.stdin.readline()
"""


class ExportLockHolder:
    """A second process that holds the exports folder's lock until released or killed."""

    def __init__(self, exports_dir: Path):
        self.process = subprocess.Popen([sys.executable, "-c", HOLD_EXPORT_LOCK, str(exports_dir)], cwd=PROJECT_ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=30) == 0

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.kill()
