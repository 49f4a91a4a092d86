"""Where models are loaded from: local folders, the demo model, the hub cache, and fast,
worded failures when the hub is out of reach (this machine has no route to the hub)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from engine.errors import ModelNotFoundError
from engine.hub import looks_like_hub_id, resolve_model, resolve_source
from tests.conftest import PROJECT_ROOT


def test_a_local_folder_or_file_is_used_as_it_is(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert resolve_source(str(tmp_path / "model")) == str(tmp_path / "model")
    assert resolve_source(f"  {tmp_path / 'data.jsonl'} ", what="dataset") == str(tmp_path / "data.jsonl")
    assert resolve_model(str(tmp_path / "model")) == str(tmp_path / "model")


def test_the_demo_name_is_the_built_demo_model(demo_model_dir):
    assert resolve_model("demo") == resolve_model(" demo ") == str(demo_model_dir)
    assert (demo_model_dir / "config.json").is_file()


def test_a_missing_path_is_a_sentence_at_once(tmp_path):
    started = time.time()
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(str(tmp_path / "no-such-model"))
    assert str(caught.value) == (f"The base model '{tmp_path / 'no-such-model'}' is not an existing local path, "
                                 "and it is not a hub id of the form owner/name.")
    assert time.time() - started < 1
    with pytest.raises(ModelNotFoundError, match="^No dataset was given.$"):
        resolve_source("  ", what="dataset")


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    assert looks_like_hub_id("meta-llama/Llama-3.2-1B")
    assert not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c") and not looks_like_hub_id("name")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_hub_id("owner/name"), "an existing relative folder is a path"


RESOLVE = """
import json, os, sys, time
import huggingface_hub.constants  # HF_HUB_OFFLINE is read here, when this module is first imported
for key, value in json.loads(sys.argv[1]).items():
    os.environ[key] = value  # set after the import, as a test or a notebook might
from engine.errors import ModelNotFoundError
from engine.hub import resolve_model
started = time.time()
try:
    answer = resolve_model(sys.argv[2])
except ModelNotFoundError as error:
    answer = "error: " + str(error)
print(json.dumps({"answer": answer, "seconds": time.time() - started}))
"""


def resolve_in_fresh_process(name: str, env: dict, later: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env.update(env)
    result = subprocess.run([sys.executable, "-c", RESOLVE, json.dumps(later or {}), name], cwd=PROJECT_ROOT,
                            env=full_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket closes


def test_an_uncached_hub_id_fails_within_seconds_in_words_when_offline(tmp_path):
    outcome = resolve_in_fresh_process("someone/some-model", {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert outcome["answer"] == (
        "error: The base model 'someone/some-model' is not a local path and looks like a hub id, but HF_HUB_OFFLINE "
        "is set and it is not in the local hub cache. Download it on a machine with network access, or pass a "
        "local folder.")
    assert outcome["seconds"] < 5


def test_offline_set_after_huggingface_hub_was_imported_still_fails_fast(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE once, when its constants are imported (transformers
    does that early); so do we. A variable set later changes neither, and the short probe of
    the hub endpoint still answers in seconds."""
    outcome = resolve_in_fresh_process(
        "someone/some-model", {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": closed_port_endpoint()},
        later={"HF_HUB_OFFLINE": "1"})
    assert outcome["answer"].startswith("error: The base model 'someone/some-model' is not a local path")
    assert "the Hugging Face hub cannot be reached" in outcome["answer"]
    assert outcome["seconds"] < 5


def test_a_hub_id_in_the_local_cache_resolves_offline(tmp_path):
    # The layout huggingface_hub writes: refs/main names a snapshot folder holding the files.
    repo = tmp_path / "models--someone--cached-model"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    assert resolve_in_fresh_process("someone/cached-model", env)["answer"] == "someone/cached-model"
    missing = resolve_in_fresh_process("someone/other-model", env)["answer"]
    assert missing.startswith("error: ") and "not in the local hub cache" in missing
