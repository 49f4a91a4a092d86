"""The Export tab end to end through gradio_client: pick a run, export, verify, download the zip."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def app(demo_lora_run, tmp_path_factory):
    import gradio as gr
    from gradio_client import Client

    from ui import export_tab
    from ui.context import AppContext

    exports_dir = tmp_path_factory.mktemp("exports").resolve()
    ctx = AppContext(runs_dir=demo_lora_run.parent, exports_dir=exports_dir)
    with gr.Blocks() as demo:
        with gr.Tab("Export"):
            export_tab.build(ctx)
    demo.queue()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(exports_dir)])
    try:
        yield Client(demo.local_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), ctx
    finally:
        demo.close()


def test_refresh_lists_runs_with_an_adapter(app, demo_lora_run):
    client, ctx = app
    run_update, exports_update = client.predict(api_name="/export_refresh")
    choices = [value for _, value in run_update["choices"]]
    assert demo_lora_run.name in choices and run_update["value"] in choices
    from engine.training.rundir import RunPaths, has_adapter

    assert all(has_adapter(RunPaths(demo_lora_run.parent / name).adapter) for name in choices)


def test_export_verify_and_download_the_zip(app, demo_lora_run):
    client, ctx = app
    status, chosen = client.predict(demo_lora_run.name, "Adapter package (PEFT)", "bf16", "2GB", "ui-adapter", False,
                                    api_name="/export_run")
    assert "**Exported** `ui-adapter`" in status and "Verification passed" in status, status
    assert "| Extract as JSON:" in status  # the per-prompt table
    assert chosen["value"] == "ui-adapter" and ["ui-adapter", "ui-adapter"] in chosen["choices"]
    assert (ctx.exports_dir / "ui-adapter" / "README.md").is_file()

    zip_status, downloaded = client.predict("ui-adapter", api_name="/export_zip")
    assert "ui-adapter.zip" in zip_status and "is ready" in zip_status
    assert (ctx.exports_dir / "ui-adapter.zip").is_file()
    # The client fetched the file over HTTP: the app served it from the exports folder.
    assert downloaded["visible"] is True and Path(downloaded["value"]).is_file()
    with zipfile.ZipFile(downloaded["value"]) as archive:
        names = set(archive.namelist())
    assert {"ui-adapter/adapter_model.safetensors", "ui-adapter/README.md", "ui-adapter/lineage.json"} <= names


def test_merged_export_from_the_tab(app, demo_lora_run):
    client, ctx = app
    status, chosen = client.predict(demo_lora_run.name, "Merged model (standalone)", "fp16", "1MB", "ui-merged",
                                    False, api_name="/export_run")
    assert "Verification passed" in status and "float16" in status, status
    assert len(list((ctx.exports_dir / "ui-merged").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("name, sentence", [
    ("../outside", "is not a valid export name: it contains '..'"),
    ("/etc/evil", "is not a valid export name"),
])
def test_bad_names_are_refused_in_words(app, demo_lora_run, name, sentence):
    client, ctx = app
    status, _ = client.predict(demo_lora_run.name, "Adapter package (PEFT)", "bf16", "2GB", name, False,
                               api_name="/export_run")
    assert status.startswith("**Export failed:**") and sentence in status
    assert "Traceback" not in status
    assert not (ctx.exports_dir.parent / "outside").exists()


def test_errors_are_sentences(app, tmp_path):
    client, ctx = app
    status, _ = client.predict("no-such-run", "Adapter package (PEFT)", "bf16", "2GB", "", False,
                               api_name="/export_run")
    assert status.startswith("**Export failed:**") and "No run named 'no-such-run'" in status
    status, _ = client.predict("../../etc", "Adapter package (PEFT)", "bf16", "2GB", "", False,
                               api_name="/export_run")
    assert status.startswith("**Export failed:**") and "not a valid run name" in status
    zip_status, _ = client.predict("never-exported", api_name="/export_zip")
    assert "There is no finished export named 'never-exported'" in zip_status



def test_a_second_export_is_refused_while_another_process_exports(app, demo_lora_run):
    """The tab obeys the engine's lock, which ``python -m engine export`` in another process holds here."""
    from tests.conftest import ExportLockHolder

    client, ctx = app
    with ExportLockHolder(ctx.exports_dir) as holder:
        status, _ = client.predict(demo_lora_run.name, "Adapter package (PEFT)", "bf16", "2GB", "while-busy", False,
                                   api_name="/export_run")
        assert status.startswith("**Export not started:** Another export is running"), status
        assert f"by process {holder.process.pid}" in status and "Traceback" not in status
        holder.release()
    assert not (ctx.exports_dir / "while-busy").exists()
