"""Retake the README's pictures: a real dashboard on the offline demo, a real Chromium, one PNG per tab.

    python docs/screenshots.py RUNS_DIR [--port 7873]

RUNS_DIR should hold a finished demo run (``python -m engine train demo-lora --runs-dir RUNS_DIR``);
the script serves the dashboard on it, drives each tab as a person would (Estimate, Load preview,
Load + Send in Chat, Export and verify) and writes docs/<tab>_tab.png. It needs Debian's
chromium (/usr/bin/chromium) and playwright's Python package, as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
VIEWPORT = {"width": 1400, "height": 900}


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the dashboard exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the dashboard did not answer at {url}")


def scroll_to(page, text: str) -> None:
    """Put the first element showing ``text`` at the top of the window (results sit below the form)."""
    page.get_by_text(text).first.evaluate("e => e.scrollIntoView({block: 'start'})")


def shoot(page, name: str) -> None:
    page.wait_for_timeout(1500)  # let Plotly finish drawing
    page.screenshot(path=str(DOCS / f"{name}_tab.png"), full_page=False)
    print(f"wrote docs/{name}_tab.png", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--port", type=int, default=7873)
    parser.add_argument("--exports-dir", type=Path, default=None)
    parser.add_argument("--tabs", default="train,memory,dataset,chat,export", help="which pictures to retake")
    args = parser.parse_args()
    tabs = set(args.tabs.split(","))
    exports = args.exports_dir or args.runs_dir.parent / "screenshot-exports"
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(args.port), "--runs-dir", str(args.runs_dir),
                               "--exports-dir", str(exports)], cwd=ROOT, start_new_session=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_for_server(url, server)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=["--no-sandbox", "--headless", "--disable-gpu"])
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_selector("#loralab-state")
            page.wait_for_function("document.querySelectorAll('#loralab-loss .js-plotly-plot').length > 0",
                                   timeout=60_000)
            if "train" in tabs:
                shoot(page, "train")
            if "memory" in tabs:
                page.get_by_role("tab", name="Memory").click()
                page.get_by_role("button", name="Estimate").click()
                page.wait_for_timeout(6000)
                scroll_to(page, "Full vs LoRA vs QLoRA")
                shoot(page, "memory")
            if "dataset" in tabs:
                page.get_by_role("tab", name="Dataset").click()
                page.get_by_role("button", name="Load preview").click()
                page.wait_for_function("document.body.innerText.includes('bad rows skipped')", timeout=300_000)
                page.get_by_role("button", name="Statistics over the whole dataset").click()
                page.wait_for_timeout(20000)
                scroll_to(page, "Raw rows (select one to render it)")
                shoot(page, "dataset")
            if "chat" in tabs:
                chat(page)
            if "export" in tabs:
                export(page)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def chat(page) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="Load", exact=True).click()
    page.wait_for_function("document.body.innerText.includes('Active adapter:')", timeout=300_000)
    page.get_by_label("Greedy").check()
    page.get_by_placeholder("Message both models").fill("Extract as JSON: the small green cup is under "
                                                        "the bed.")
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function("document.body.innerText.includes('\"object\"')", timeout=300_000)
    page.wait_for_timeout(4000)
    shoot(page, "chat")


def export(page) -> None:
    page.get_by_role("tab", name="Export").click()
    page.get_by_label("Replace an export of the same name").check()  # a retake replaces the last one
    page.get_by_role("button", name="Export and verify").click()
    page.wait_for_function("document.body.innerText.includes('Exported')", timeout=600_000)
    shoot(page, "export")


if __name__ == "__main__":
    main()
