"""The real dashboard (``python app.py``) driven by gradio_client and by a real browser."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.config import load_preset
from engine.training import rundir
from engine.training.jobs import wait_for_state
from tests.conftest import PROJECT_ROOT

SHORT_RUN = {"train.max_steps": 400, "train.eval_steps": 10}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dashboard:
    def __init__(self, runs_dir: Path, extra_args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runs_dir = runs_dir
        self.log = open(runs_dir.parent / f"app-{self.port}.log", "wb")
        self.started = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), "--runs-dir", str(runs_dir),
             "--exports-dir", str(runs_dir.parent / "exports"), *extra_args],
            cwd=PROJECT_ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.startup_s = self._wait_until_served()

    def _wait_until_served(self, timeout=90) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text())
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return time.time() - self.started
            except urllib.error.HTTPError:
                return time.time() - self.started  # served (e.g. 401 behind auth)
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("dashboard did not start")

    def close(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=20)
        self.log.close()


def form_values(preset="demo-lora", **changes):
    from ui.train_tab import FIELD_NAMES, config_to_values

    values = dict(zip(FIELD_NAMES, config_to_values(load_preset(preset))))
    values.update(changes)
    return [values[name] for name in FIELD_NAMES]


@pytest.fixture()
def dashboard(tmp_path, demo_model_dir):
    board = Dashboard(tmp_path / "runs")
    yield board
    board.close()
    for run_dir in (tmp_path / "runs").glob("*"):  # no worker outlives its test
        pid = rundir.read_status(run_dir).get("pid")
        if pid and rundir.read_status(run_dir).get("state") in rundir.ACTIVE_STATES:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_start_watch_stop_through_gradio_client(dashboard):
    from gradio_client import Client

    print(f"dashboard served after {dashboard.startup_s:.1f} s")
    client = Client(dashboard.url, verbose=False)

    # An invalid value is refused with the engine's message, and nothing starts.
    bad = client.predict("demo-lora", "lora", *form_values(**{"lora.lora_dropout": 1.5}), api_name="/start")
    assert "lora.lora_dropout" in json.dumps(bad) and "0 <= dropout < 1" in json.dumps(bad)
    assert rundir.list_runs(dashboard.runs_dir) == []

    # Show command gives the headless equivalent of the form.
    shown = client.predict("demo-lora", "lora", *form_values(**{"train.max_steps": 7}), api_name="/show_command")
    assert "python -m engine train presets/demo-lora.yaml" in json.dumps(shown)
    assert "train.max_steps=7" in json.dumps(shown)

    client.predict("demo-lora", "lora", *form_values(**{"train.max_steps": 400, "train.save_steps": 5}),
                   api_name="/start")
    listed = rundir.list_runs(dashboard.runs_dir)
    assert len(listed) == 1
    run_dir = listed[0].path

    # Metrics arrive in the chart payload through the same tick the page uses.
    deadline = time.time() + 240
    loss_points = 0
    while time.time() < deadline and loss_points < 2:
        status, loss_plot, *_ = client.predict(run_dir.name, "", api_name="/tick")
        if loss_plot and isinstance(loss_plot, dict) and loss_plot.get("plot"):
            figure = json.loads(loss_plot["plot"])
            loss_points = sum(len(trace.get("y") or []) for trace in figure["data"] if "loss" in trace.get("name", ""))
        time.sleep(1)
    assert loss_points >= 2, rundir.log_tail(run_dir)
    assert "Training" in status or "Evaluating" in status

    note = client.predict(run_dir.name, api_name="/stop")
    assert "Stopping" in note
    assert wait_for_state(run_dir, {"stopped", "failed"}, 90) == "stopped", rundir.log_tail(run_dir)
    assert (rundir.RunPaths(run_dir).adapter / "adapter_model.safetensors").exists()
    status, *_ = client.predict(run_dir.name, "", api_name="/tick")
    assert "Stopped" in status


def test_auth_refuses_a_client_without_credentials(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    board = Dashboard(tmp_path / "runs", extra_args=["--auth", "alice:wonderland"])
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(board.url, verbose=False)
        client = Client(board.url, auth=("alice", "wonderland"), verbose=False)
        assert "demo" in json.dumps(client.predict("demo-lora", api_name="/load_preset"))
    finally:
        board.close()


def test_browser_starts_a_run_and_sees_the_loss_chart(dashboard, artifacts_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.goto(dashboard.url)
        page.locator("#loralab-start").click()
        # The loss chart has points once a plotly trace with data is drawn in it.
        page.wait_for_function(
            """() => { const el = document.querySelector('#loralab-loss .js-plotly-plot');
                        return el && el.data && el.data.some(t => t.y && t.y.length >= 2); }""",
            timeout=240_000,
        )
        page.screenshot(path=str(artifacts_dir / "train_tab.png"), full_page=False)
        page.get_by_text("Runs", exact=True).first.scroll_into_view_if_needed()
        table_text = page.locator("#loralab-runs-table").inner_text()
        assert "lora" in table_text
        page.screenshot(path=str(artifacts_dir / "runs_table.png"), full_page=True)
        page.locator("#loralab-stop").click()
        browser.close()
    listed = rundir.list_runs(dashboard.runs_dir)
    assert len(listed) == 1
    assert wait_for_state(listed[0].path, {"stopped", "failed"}, 90) == "stopped"
