"""Launch flags: loopback by default, auth parsing, the warning for an open bind without auth; a light start-up."""

import subprocess
import sys

import app
from tests.conftest import PROJECT_ROOT


def test_defaults_bind_loopback_only(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7999 and args.auth is None
    assert app.is_loopback("127.0.0.1") and app.is_loopback("localhost") and app.is_loopback("::1")
    assert not app.is_loopback("0.0.0.0") and not app.is_loopback("192.168.1.5")


def test_auth_from_a_pair_or_a_file(tmp_path):
    assert app.parse_auth("alice:s3:cret") == [("alice", "s3:cret")]
    pairs = tmp_path / "users.txt"
    pairs.write_text("# team\nalice:one\nbob:two\n")
    assert app.parse_auth(str(pairs)) == [("alice", "one"), ("bob", "two")]
    assert app.parse_auth(None) is None


def test_the_whole_page_is_built_without_a_model_library():
    """Start-up stays in seconds: building every tab imports no torch, transformers, peft, trl or datasets."""
    code = """
import sys, tempfile, pathlib
import engine.training.jobs, engine.training.sampler
from ui.context import AppContext
from ui.layout import TABS, build_app
folder = pathlib.Path(tempfile.mkdtemp())
build_app(AppContext(runs_dir=folder / "runs", exports_dir=folder / "exports"))
assert all(module in sys.modules for _, module in TABS)
print(sorted({"torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"} & set(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
