"""Metric-to-chart latency: time from a metrics line being written to it being in the chart payload.

Launches the dashboard in-process on the offline demo, starts a real demo run with a
metrics line every step, and polls the Train tab's tick endpoint through gradio_client at
the page's own timer interval. For each step, latency = time the payload containing it
arrived - the ``t`` the worker stamped on the line. Prints p50 and p95 (target p95 <= 1 s).

    python bench/ui_latency.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK_S = 0.5  # the Train tab's gr.Timer interval


def steps_in_payload(loss_plot) -> set[int]:
    if not isinstance(loss_plot, dict) or not loss_plot.get("plot"):
        return set()
    figure = json.loads(loss_plot["plot"])
    return {int(x) for trace in figure["data"] if "loss" in (trace.get("name") or "") for x in trace.get("x") or []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gradio_client import Client

    from engine.training import rundir
    from engine.config import load_preset
    from engine.demo import ensure_demo_model
    from engine.training.jobs import JobManager
    from ui.context import AppContext
    from ui.layout import build_app

    ensure_demo_model()
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = Path(scratch) / "runs"
        jobs = JobManager(runs_dir, poll_s=0.2).start()
        demo = build_app(AppContext(runs_dir=runs_dir, exports_dir=Path(scratch) / "exports", jobs=jobs))
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        client = Client(demo.local_url, verbose=False)
        run_dir = jobs.submit(load_preset("demo-lora", ["train.max_steps=100000", "train.logging_steps=1",
                                                        "train.eval_steps=100000", "train.save_steps=100000"]))
        latencies, seen = [], set()
        deadline = time.time() + args.seconds + 120
        first_metric = None
        while time.time() < deadline:
            _, loss_plot, *_ = client.predict(run_dir.name, "", api_name="/tick")
            arrived = time.time()
            written = {m["step"]: m["t"] for m in rundir.read_metrics(run_dir) if m.get("event") == "log"}
            for step in steps_in_payload(loss_plot) - seen:
                if step in written:
                    latencies.append(arrived - written[step])
                    seen.add(step)
            if written and first_metric is None:
                first_metric = time.time()
            if first_metric and time.time() - first_metric > args.seconds:
                break
            time.sleep(TICK_S)
        jobs.stop(run_dir.name, force=True)
        jobs.shutdown()
        demo.close()
    if not latencies:
        print("no metrics reached the chart")
        sys.exit(1)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"{len(latencies)} metric lines: p50 {statistics.median(latencies):.3f} s, p95 {p95:.3f} s, "
          f"max {latencies[-1]:.3f} s (target p95 <= 1 s)")


if __name__ == "__main__":
    main()
