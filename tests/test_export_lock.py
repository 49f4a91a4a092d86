"""One export at a time per exports folder, across processes: the engine's lock, export_run and the CLI obey it.

The lock is held by a real second Python process; no model is loaded, because a second
export is refused before anything heavy starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.export.exporter import ExportError, export_run
from engine.export.lock import LOCK_NAME, ExportBusyError, export_lock
from tests.conftest import PROJECT_ROOT, ExportLockHolder


def fake_finished_run(runs_dir: Path) -> Path:
    """A run folder that passes every check before the lock (adapter files present, not active)."""
    from engine.config import load_preset
    from engine.training.rundir import RunPaths, create_run

    run_dir = create_run(runs_dir, load_preset("demo-lora"), name="finished")
    adapter = RunPaths(run_dir).adapter
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return run_dir


def test_a_second_process_is_refused_in_words_until_the_first_releases(tmp_path):
    with ExportLockHolder(tmp_path) as holder:
        with pytest.raises(ExportBusyError) as caught:
            with export_lock(tmp_path, "run 'mine' as an adapter package"):
                pytest.fail("the lock was taken twice")
        message = str(caught.value)
        assert message.startswith(f"Another export is running in {tmp_path.resolve()}")
        assert f"by process {holder.process.pid}, exporting run 'other' as a merged model" in message
        assert "Export again when it has finished." in message
        holder.release()
    with export_lock(tmp_path, "run 'mine' as an adapter package"):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["what"] == "run 'mine' as an adapter package"
    assert not (tmp_path / LOCK_NAME).exists()  # the exports folder holds only exports between exports


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    with ExportLockHolder(tmp_path) as holder:
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock with the process
        assert (tmp_path / LOCK_NAME).exists()
        with export_lock(tmp_path, "after the crash"):
            pass


def test_two_exports_in_one_process_exclude_each_other_too(tmp_path):
    """Two browser tabs of one dashboard are two threads of one process."""
    with export_lock(tmp_path, "the first tab"):
        with pytest.raises(ExportBusyError, match=f"by process {os.getpid()}, exporting the first tab"):
            with export_lock(tmp_path, "the second tab"):
                pass


def test_export_run_and_the_cli_are_refused_before_loading_anything(tmp_path):
    run_dir = fake_finished_run(tmp_path / "runs")
    exports = tmp_path / "exports"
    with ExportLockHolder(exports) as holder:
        started = time.monotonic()
        with pytest.raises(ExportBusyError, match="Another export is running"):
            export_run(run_dir, exports, kind="merged")
        assert time.monotonic() - started < 5
        # Bad input is still named first: the name is checked before the lock is asked for.
        with pytest.raises(ExportError, match="is not a valid export name"):
            export_run(run_dir, exports, kind="adapter", name="../outside")

        cli = subprocess.run([sys.executable, "-m", "engine", "export", run_dir.name, "--runs-dir", str(run_dir.parent),
                              "--exports-dir", str(exports), "--merged"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=120)
        assert cli.returncode == 1, cli.stderr
        assert cli.stderr.startswith("error: Another export is running") and "Traceback" not in cli.stderr
        holder.release()
    assert list(exports.iterdir()) == []  # no staging folder, no export, and the released lock's file is gone


def test_the_export_tab_handler_says_not_started_while_busy(tmp_path):
    """``ui.export_tab.do_export`` called directly, as the tab wires it: the refusal is a sentence, not an error."""
    from ui import export_tab
    from ui.context import AppContext

    run_dir = fake_finished_run(tmp_path / "runs")
    ctx = AppContext(runs_dir=run_dir.parent, exports_dir=tmp_path / "exports")
    with ExportLockHolder(ctx.exports_dir) as holder:
        status, update = export_tab.do_export(ctx, run_dir.name, "Merged model (standalone)", "bf16", "2GB", "", False)
        assert status.startswith("**Export not started:** Another export is running")
        assert f"by process {holder.process.pid}" in status and update == {"__type__": "update"}
    status, _ = export_tab.do_export(ctx, "", "Adapter package (PEFT)", "bf16", "2GB", "", False)
    assert status.startswith("**Export failed:** choose a run")
    runs, exports = export_tab.refresh_lists(ctx)
    assert runs["choices"] == [run_dir.name] and exports["choices"] == []


CONTEND = """
import os, sys, time
from engine.export.lock import ExportBusyError, export_lock
folder, got, end = sys.argv[1], 0, time.monotonic() + 1.5
while time.monotonic() < end:
    try:
        with export_lock(folder, "contention"):
            got += 1
            # Fails with FileExistsError if another process is inside at the same moment.
            os.close(os.open(os.path.join(folder, "inside"), os.O_CREAT | os.O_EXCL))
            time.sleep(0.0005)
            os.unlink(os.path.join(folder, "inside"))
    except ExportBusyError:
        time.sleep(0.0002)
print(got)
"""


def test_the_lock_excludes_under_contention_although_its_file_is_removed_on_release(tmp_path):
    """Removing the file on release must not let two processes hold locks on two different files."""
    processes = [subprocess.Popen([sys.executable, "-c", CONTEND, str(tmp_path)], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in results]
    assert sum(int(out) for out, _ in results) > 50  # the lock was taken often, and no two holders met inside
