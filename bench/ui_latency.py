"""Viewers against training: metric-to-chart latency, and what watching costs the run's tokens/s.

Serves the real dashboard (``python app.py`` in its own process), starts a real demo run from
the command line with a metrics line every step, and has viewers poll the Train tab's tick
endpoint at the page's own timer interval, each through its own gradio_client session (as a
browser tab would: the server keeps each session's last chart key). Two contenders alternate
in one run, phase after phase: 1 viewer, then ``--viewers`` viewers, then 1 again...

* latency: for each step, the time the first payload holding it reached a viewer minus the
  ``t`` the worker stamped on its metrics line (target: p95 <= 1 s with ``--viewers``);
* tokens/s: the worker's own ``tokens_seen`` over each phase (its first seconds left out),
  averaged per contender (target: ``--viewers`` within 15% of one viewer).

    python bench/ui_latency.py --viewers 5 [--phase-seconds 30] [--rounds 3]

Timings on a shared machine are noisy: the script prints the load average it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK_S = 0.5  # the Train tab's gr.Timer interval
WARM_S = 3.0  # seconds of each phase left out of its tokens/s (viewers joining, caches filling)


def steps_in_payload(loss_plot) -> set[int]:
    if not isinstance(loss_plot, dict) or not loss_plot.get("plot"):
        return set()
    figure = json.loads(loss_plot["plot"])
    return {int(x) for trace in figure["data"] if "loss" in (trace.get("name") or "") for x in trace.get("x") or []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def written_steps(run_dir: Path) -> dict[int, float]:
    from engine.training import rundir

    return {m["step"]: m["t"] for m in rundir.read_metrics(run_dir) if m.get("event") == "log" and m.get("t")}


class Viewer(threading.Thread):
    """One browser tab: ticks every TICK_S while ``active`` is set; records each step's latency once."""

    def __init__(self, url: str, run_dir: Path, latencies: list, lock: threading.Lock):
        super().__init__(daemon=True)
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.run_dir, self.latencies, self.lock = run_dir, latencies, lock
        self.active, self.stop = threading.Event(), threading.Event()
        self.seen: set[int] = set()
        self.joined_at = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.active.wait(0.1):
                continue
            began = time.time()
            _, loss_plot, *_ = self.client.predict(self.run_dir.name, api_name="/tick")
            arrived = time.time()
            new = steps_in_payload(loss_plot) - self.seen
            if new:
                written = written_steps(self.run_dir)
                with self.lock:
                    for step in new:
                        # Only steps written while this viewer was watching measure the dashboard.
                        if step in written and written[step] >= self.joined_at:
                            self.latencies.append(arrived - written[step])
                self.seen |= new
            time.sleep(max(0.0, TICK_S - (time.time() - began)))


def tokens_per_second(run_dir: Path, start: float, end: float) -> float | None:
    from engine.training import rundir

    points = [(m["t"], m["tokens_seen"]) for m in rundir.read_metrics(run_dir)
              if m.get("event") == "log" and m.get("tokens_seen") and start + WARM_S <= m.get("t", 0) <= end]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--phase-seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.demo import ensure_demo_model

    ensure_demo_model()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = Path(scratch) / "runs"
        runs_dir.mkdir()
        env = {**os.environ, "LORALAB_LOCK_DIR": str(Path(scratch) / "locks")}  # this bench's device lock only
        port = free_port()
        log = open(Path(scratch) / "app.log", "wb")
        app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs_dir),
                                "--exports-dir", str(Path(scratch) / "exports")], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        run_dir = runs_dir / "bench"
        viewers: list[Viewer] = []
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError as error:
                    if time.time() > deadline or app.poll() is not None:
                        log = (Path(scratch) / "app.log").read_text()
                        raise SystemExit(f"the dashboard did not start:\n{log}") from error
                    time.sleep(0.3)
            subprocess.run([sys.executable, "-m", "engine", "train", "demo-lora", "--name", "bench", "--detach",
                            "--runs-dir", str(runs_dir), "--set", "train.max_steps=100000", "--set",
                            "train.logging_steps=1", "--set", "train.eval_steps=100000", "--set",
                            "train.save_steps=100000", "--set", "data.eval_path=", "--set", "data.eval_fraction=0",
                            "--set", "eval.metric=none"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            while len(written_steps(run_dir)) < 3:
                time.sleep(0.5)

            lock = threading.Lock()
            results = {1: {"latency": [], "tokens": [], "cpu": []},
                       args.viewers: {"latency": [], "tokens": [], "cpu": []}}
            dashboard = psutil.Process(app.pid)
            viewers = [Viewer(url, run_dir, [], lock) for _ in range(args.viewers)]
            for viewer in viewers:
                viewer.start()
            for round_number in range(args.rounds):
                for count in (1, args.viewers):
                    latencies: list[float] = []
                    for index, viewer in enumerate(viewers):
                        viewer.latencies = latencies
                        if index < count:
                            viewer.joined_at = time.time()
                            viewer.active.set()
                        else:
                            viewer.active.clear()
                    start = time.time()
                    cpu_before = sum(dashboard.cpu_times()[:2])
                    time.sleep(args.phase_seconds)
                    end = time.time()
                    results[count]["cpu"].append((sum(dashboard.cpu_times()[:2]) - cpu_before) / (end - start))
                    speed = tokens_per_second(run_dir, start, end)
                    results[count]["latency"] += latencies
                    if speed:
                        results[count]["tokens"].append(speed)
                    p95 = f"{percentile(latencies, 0.95):.3f} s" if latencies else "-"
                    print(f"round {round_number + 1}, {count} viewer(s): {len(latencies)} latencies, p95 {p95}, "
                          f"{speed or 0:.0f} tokens/s, dashboard CPU {results[count]['cpu'][-1]:.0%} of a core",
                          flush=True)
        finally:
            for viewer in viewers:
                viewer.stop.set()
            subprocess.run([sys.executable, "-m", "engine", "stop", "bench", "--force", "--runs-dir",
                            str(runs_dir)], cwd=ROOT, env=env, capture_output=True)
            os.killpg(app.pid, signal.SIGTERM)
            app.wait(timeout=30)
            log.close()
    load_after = os.getloadavg()

    print(f"\nload average: {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
          f"({os.cpu_count()} cores; other work on the machine makes these figures noisy)")
    one, many = results[1], results[args.viewers]
    for count, result in ((1, one), (args.viewers, many)):
        lat = result["latency"]
        if lat:
            print(f"{count} viewer(s): {len(lat)} metric lines, latency p50 {statistics.median(lat):.3f} s, "
                  f"p95 {percentile(lat, 0.95):.3f} s, max {max(lat):.3f} s; "
                  f"tokens/s {statistics.mean(result['tokens']):.0f} (phases: "
                  f"{', '.join(f'{t:.0f}' for t in result['tokens'])}); dashboard CPU "
                  f"{statistics.mean(result['cpu']):.0%} of a core")
    if not many["latency"] or not one["tokens"] or not many["tokens"]:
        raise SystemExit("not enough measurements: longer phases (--phase-seconds) or a less loaded machine")
    p95 = percentile(many["latency"], 0.95)
    ratio = statistics.mean(many["tokens"]) / statistics.mean(one["tokens"])
    print(f"{args.viewers} viewers: p95 {p95:.3f} s (target <= 1 s: {'met' if p95 <= 1 else 'MISSED'}); "
          f"tokens/s {ratio:.1%} of one viewer's (target >= 85%: {'met' if ratio >= 0.85 else 'MISSED'})")


if __name__ == "__main__":
    main()
