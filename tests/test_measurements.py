"""The measured comparison: full fine-tuning, LoRA and QLoRA trained here, beside the prediction.

The slow test runs the real thing through the command line: three worker processes under the
job manager, each with the memory probe, on a small random-weight model (a few million
parameters, batch 1 x 32 tokens, 2 steps) so it stays short on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A Llama-layout model with random weights, the memory shape of a real one: block weights dominate."""
    from engine.memory.arch import arch_from_numbers
    from engine.memory.random_model import demo_texts, save_random_model

    arch = arch_from_numbers(512, 2, 8, 4, 2048, 2048, tie_word_embeddings=True, name="small-measure")
    return save_random_model(arch, tmp_path_factory.mktemp("models") / "small", tokenizer_texts=demo_texts())


def test_run_config_is_the_inverse_of_the_estimators_mapping():
    from engine.measurements import measurement_settings, run_config_for
    from engine.memory import settings_from_run_config

    settings = replace(measurement_settings(), rank=8, alpha=16, targets=["q_proj", "v_proj"], seq_len=64,
                       optimizer="adamw_torch")
    for method in ("full", "lora", "qlora"):
        config = run_config_for("some/folder", settings, method, steps=3)
        name, back = settings_from_run_config(config)
        assert name == "some/folder" and back.method == method and config.train.memory_probe
        for field in ("rank", "alpha", "targets", "batch_size", "seq_len", "gradient_checkpointing", "optimizer",
                      "compute_dtype", "double_quant", "lora_dropout"):
            assert getattr(back, field) == getattr(settings, field), field
        assert config.train.max_steps == 3 and config.train.save_steps > 3 and config.data.eval_fraction == 0


def test_a_model_too_large_is_refused_with_both_numbers(tmp_path):
    import psutil

    from engine.errors import LoraLabError
    from engine.measurements import MeasureRequest, preflight, run_measurement
    from engine.memory import load_arch

    available = psutil.virtual_memory().available
    request = MeasureRequest(model="llama-3.1-70b").check()
    with pytest.raises(LoraLabError) as caught:
        preflight(request, load_arch("llama-3.1-70b"), "cpu", available, "available RAM")
    text = str(caught.value)
    assert "llama-3.1-70b" in text and "Full fine-tuning needs about" in text
    assert f"{available:,} bytes" in text and "GiB" in text and "smaller model" in text
    predicted = int(text.split("(")[1].split(" bytes")[0].replace(",", ""))
    assert predicted > 70e9 * 4  # 70 B fp32 weights at least

    # The whole action refuses before building, training or writing anything.
    with pytest.raises(LoraLabError, match="refused"):
        run_measurement(MeasureRequest(model="llama-3.1-70b"), tmp_path)
    assert not (tmp_path / ".measure").exists()

    # Only LoRA and QLoRA of a model whose full fine-tuning does not fit: the sentence says which fit.
    arch = load_arch("smollm2-360m")
    needs = preflight(MeasureRequest(model="smollm2-360m", methods=("lora", "qlora")).check(), arch, "cpu",
                      10**12, "plenty")
    with pytest.raises(LoraLabError, match=r"Measure only qlora \(--methods qlora\)"):
        preflight(MeasureRequest(model="smollm2-360m", methods=("lora", "qlora")).check(), arch, "cpu",
                  (needs["lora"] + needs["qlora"]) // 2, "half")


def test_bad_requests_are_sentences_in_the_tab(tmp_path):
    from ui import memory_tab

    values = {"rank": 16, "alpha": 32, "targets": "all-linear", "dora": False, "lora_dropout": 0.0,
              "gradient_checkpointing": True, "optimizer": "adamw_torch_fused", "compute_dtype": "bfloat16",
              "double_quant": True, "attn": "sdpa", "loss": "full_logits", "kbit_upcast": True,
              "measure_model": "smollm2-360m", "measure_batch": 1, "measure_seq_len": 48, "measure_steps": 2}
    updates = list(memory_tab.run_measure(tmp_path, None, values))
    assert updates[-1][0].startswith("**Cannot measure:**") and "chunked" in updates[-1][0]
    updates = list(memory_tab.run_measure(tmp_path, None, dict(values, loss="chunked", measure_steps=0)))
    assert updates[-1][0].startswith("**Cannot measure:**") and "steps" in updates[-1][0]
    updates = list(memory_tab.run_measure(tmp_path, None, dict(values, loss="chunked", measure_model="llama-3.1-70b")))
    assert updates[-1][0].startswith("**Cannot measure:** Measuring llama-3.1-70b is refused")
    assert not (tmp_path / ".measure").exists()


def test_tracker_says_what_was_alive_at_the_peak():
    import torch

    from engine.memory.live import LiveBytesTracker

    weight = torch.nn.Parameter(torch.randn(256, 256))
    tracker = LiveBytesTracker()
    tracker.add_storage(weight.untyped_storage(), "model", "weights")
    with tracker:
        tracker.phase = "forward"
        hidden = torch.randn(64, 256) @ weight
        tracker.phase = "backward"
        hidden.sum().backward()
        tracker.retag(weight.grad.untyped_storage(), "gradients")
    assert tracker.peak == sum(tracker.peak_by_tag.values())
    assert tracker.peak_by_tag["weights"] == 256 * 256 * 4
    assert tracker.live_by_tag["gradients"] == 256 * 256 * 4
    assert set(tracker.phase_peaks) == {"forward", "backward"}


@pytest.fixture(scope="module")
def measured(small_model, tmp_path_factory) -> tuple[Path, dict]:
    """One three-way measurement through the command line: (runs dir, the JSON it printed)."""
    runs_dir = tmp_path_factory.mktemp("measured") / "runs"
    command = [sys.executable, "-m", "engine", "memory", "--measure", "--model", str(small_model), "--seq-len", "32",
               "--steps", "2", "--runs-dir", str(runs_dir), "--json"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs_dir, json.loads(done.stdout)


@pytest.mark.slow
def test_three_way_measurement_through_the_cli_and_the_job_manager(measured):
    from engine.measurements import list_measurements, read_measurement
    from ui import memory_tab

    runs_dir, result = measured
    methods = result["methods"]
    assert [m["state"] for m in methods.values()] == ["completed"] * 3, [m.get("error") for m in methods.values()]
    full, lora, qlora = (methods[m]["measured"] for m in ("full", "lora", "qlora"))

    # The claims: 4-bit weights are at least 3x smaller; full fine-tuning holds at least what LoRA holds.
    assert qlora["weights_bytes"] * 3 < lora["weights_bytes"]
    assert full["weights_bytes"] >= lora["weights_bytes"] and full["peak_bytes"] > lora["peak_bytes"]
    assert full["optimizer_state_bytes"] == pytest.approx(2 * full["weights_bytes"], rel=0.02)  # AdamW: 2 fp32 states
    assert lora["optimizer_state_bytes"] * 10 < full["optimizer_state_bytes"]
    for name, entry in methods.items():
        measured, predicted = entry["measured"], entry["predicted"]
        assert sum(measured["groups"].values()) == measured["peak_bytes"], name
        assert measured["batch_shape"] == [1, 32], name
        assert measured["rss_peak_minus_baseline_bytes"] > 0 and measured["rss_source"], name
        assert predicted["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.25), name
        assert predicted["weights_bytes"] == pytest.approx(measured["weights_bytes"], rel=0.05), name
        run_dir = runs_dir / ".measure" / result["id"] / name
        assert (run_dir / "memory_probe.json").is_file() and (run_dir / "config.yaml").is_file()
        assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoints").exists()  # figures, not weights
    assert result["summary"][0].startswith("QLoRA used ") and "than LoRA; predicted " in result["summary"][0]
    assert any(s.startswith("Weights alone: QLoRA held ") for s in result["summary"])

    # A fresh reader (a restarted dashboard) finds it again, and the tab draws it.
    saved = read_measurement(runs_dir / ".measure" / result["id"])
    assert saved["methods"] == methods and saved["state"] == "complete"
    assert [row["id"] for row in list_measurements(runs_dir)] == [result["id"]]
    text, figure, rows = memory_tab.show_measurement(runs_dir, result["id"])
    assert result["summary"][0] in text and len(rows) == 3
    assert {trace.name for trace in figure.data} >= {"Weights (base model)", "Activations and temporaries"}
    dropdown, *_ = memory_tab.load_saved_measurements(runs_dir)
    assert dropdown["value"] == result["id"]

    listed = subprocess.run([sys.executable, "-m", "engine", "memory", "--measurements", "--runs-dir", str(runs_dir)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and result["id"] in listed.stdout and "QLoRA used" in listed.stdout
    shown = subprocess.run([sys.executable, "-m", "engine", "memory", "--show-measurement", result["id"],
                            "--runs-dir", str(runs_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "QLoRA (4-bit NF4 base)" in shown.stdout and "RSS-base" in shown.stdout


@pytest.mark.slow
def test_the_cli_refuses_a_model_too_large_for_this_machine(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine", "memory", "--measure", "--model", "llama-3.1-70b",
                           "--runs-dir", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "refused" in done.stderr and "bytes) of available RAM (psutil.virtual_memory().available)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_memory_tab_shows_a_saved_measurement_after_a_restart(measured, artifacts_dir):
    """A dashboard started over the runs folder lists the measurement and draws it in a real browser."""
    from playwright.sync_api import sync_playwright
    from test_app_e2e import Dashboard

    runs_dir, result = measured
    board = Dashboard(runs_dir)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=["--no-sandbox", "--headless", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(board.url)
            page.get_by_role("tab", name="Memory").click()
            page.wait_for_function(
                """() => { const el = document.querySelector('#loralab-measured-plot .js-plotly-plot');
                            return el && el.data && el.data.filter(t => t.type === 'bar').length === 3; }""",
                timeout=60_000)
            page.locator("#loralab-measured").scroll_into_view_if_needed()
            assert result["summary"][0] in page.locator("#loralab-measure-status").inner_text()
            assert "QLoRA (4-bit NF4 base)" in page.locator("#loralab-measured-table").inner_text()
            page.screenshot(path=str(artifacts_dir / "memory_measured.png"), full_page=False)
            browser.close()
    finally:
        board.close()
