"""The installable package: the ``loralab`` command (one dispatch table with ``python -m engine``), its
--help and --version, and a real ``pip install .`` into a fresh virtual environment, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import app
from engine import __version__
from engine.__main__ import COMMANDS
from engine.lineage import git_commit
from tests.conftest import PROJECT_ROOT


def test_the_console_script_is_app_cli_and_the_version_is_the_engines():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"] == {"loralab": "app:cli"}
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "engine.__version__"}
    assert project["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]  # the old tables are kept


def test_loralab_version_prints_the_version_and_the_git_commit(capsys):
    assert app.cli(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    commit = git_commit().get("commit")
    assert line.startswith(f"loralab {__version__} (")
    assert (commit[:12] in line) if commit else "not run from a git checkout" in line


def test_loralab_lists_ui_and_every_engine_command(capsys):
    assert app.cli([]) == 0
    listed = capsys.readouterr().out
    for name in ["ui", *COMMANDS]:
        assert f"\n  {name} " in listed, name
    assert app.cli(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ui", *COMMANDS])
def test_every_command_lists_its_options_with_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        app.cli([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "-h, --help" in text
    if command == "ui":
        for flag in ("--host", "--port", "--runs-dir", "--exports-dir", "--auth", "--max-upload-mb"):
            assert flag in text  # the same flags as python app.py


def test_python_m_engine_keeps_working_with_the_same_table():
    done = subprocess.run([sys.executable, "-m", "engine", "--version"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"loralab {__version__}")
    done = subprocess.run([sys.executable, "-m", "engine"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "ui " not in done.stdout and all(f"  {c} " in done.stdout for c in COMMANDS)


SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "exports", "artifacts", "build",
                                       "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis")


@pytest.mark.slow
def test_pip_install_dot_into_a_fresh_venv_works_offline(tmp_path):
    """A plain (non-editable) install, built offline from a copy of the source with this environment's setuptools
    (--no-build-isolation) and its installed packages (--no-deps); then used from another folder."""
    source = tmp_path / "source"
    shutil.copytree(PROJECT_ROOT, source, ignore=SOURCE_IGNORE, symlinks=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The fresh environment sees this one's packages (torch, transformers, pip, setuptools...) through a .pth
    # line, as --system-site-packages would for a system Python; LoRA Lab itself is installed into it.
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    (site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def loralab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "loralab", *args], cwd=elsewhere, capture_output=True, text=True,
                              env=env, timeout=300)

    version = loralab("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"loralab {__version__} (git commit unknown: not run from a git checkout)"
    assert loralab("ui", "--help").returncode == 0
    # presets/ travelled inside the package: the presets, the demo data and the calculator's architectures.
    probe = subprocess.run([python, "-c", "import engine, json; from engine.config import list_presets; "
                            "from engine.demo import DEMO_DATA_DIR; print(json.dumps([engine.__file__, "
                            "list_presets(), sorted(p.name for p in DEMO_DATA_DIR.iterdir())]))"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    where, presets, data = json.loads(probe.stdout)
    assert where.startswith(str(venv)) and "demo-lora" in presets and "demo_train.jsonl" in data
    memory = loralab("memory", "--model", "llama-3.1-8b", "--method", "qlora", "--seq-len", "2048", "--json")
    assert memory.returncode == 0, memory.stderr
    assert json.loads(memory.stdout)["model"] == "llama-3.1-8b"
    runs = loralab("runs")
    assert runs.returncode == 0 and "no runs in runs" in runs.stdout  # the current folder's runs/
