"""Start-up: seconds from ``python app.py`` to a served page, over the same for a one-textbox Gradio app.

Both are started as fresh processes, alternated, several runs each; each is timed from the
spawn until ``GET /`` answers 200 with the page (Gradio serves the app's config inside it),
then killed. Prints each time, the medians and their ratio (target: at most 1.15x). The
floor is Gradio itself (importing it is most of the one-textbox app's time), so the ratio
measures what LoRA Lab adds: its imports and building its five tabs.

    python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_TEXTBOX = """
import sys
import gradio as gr
with gr.Blocks() as demo:
    gr.Textbox(label="text")
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), enable_monitoring=False)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_page(command: list[str], port: int, timeout: float = 180.0) -> float:
    """Seconds from spawning ``command`` until http://127.0.0.1:port/ serves the page."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"{command[1]} exited with {process.returncode}: "
                                   f"{process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    if response.status == 200 and b"gradio" in response.read().lower():
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"{command[1]} served no page within {timeout:.0f} s")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each, alternated")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="loralab-startup-"))
    baseline_script = scratch / "one_textbox.py"
    baseline_script.write_text(ONE_TEXTBOX, encoding="utf-8")

    def lora_lab(port: int) -> list[str]:
        return [sys.executable, "app.py", "--port", str(port), "--runs-dir", str(scratch / "runs"),
                "--exports-dir", str(scratch / "exports")]

    def one_textbox(port: int) -> list[str]:
        return [sys.executable, str(baseline_script), str(port)]

    contenders = {"LoRA Lab": lora_lab, "one textbox": one_textbox}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(args.runs):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            port = free_port()
            seconds = time_to_page(contenders[name](port), port)
            times[name].append(seconds)
            print(f"run {index + 1} {name:>11}: {seconds:6.2f} s", flush=True)
    app, base = statistics.median(times["LoRA Lab"]), statistics.median(times["one textbox"])
    print(f"\nmedian: LoRA Lab {app:.2f} s, one-textbox Gradio app {base:.2f} s, ratio {app / base:.2f}x "
          f"(target <= 1.15x; the machine is shared, so compare medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
