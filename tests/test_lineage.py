"""What a run was made from: content hashes of model folders and the software that trained it."""

from __future__ import annotations

import hashlib
import re
import shutil
import time

from engine import __version__
from engine.lineage import PACKAGES, file_sha256, folder_content_hash, model_lineage, software_lineage


def _model_folder(root):
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 64}')
    (root / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "notes.md").write_text("not part of the model")
    (root / "sub").mkdir()
    return root


def test_file_hash_is_the_sha256_of_the_whole_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc" * 100_000)
    assert file_sha256(path) == (hashlib.sha256(b"abc" * 100_000).hexdigest(), True)


def test_folder_hash_is_stable_and_names_what_it_covers(tmp_path):
    folder = _model_folder(tmp_path / "model")
    first = folder_content_hash(folder)
    assert re.fullmatch(r"[0-9a-f]{64}", first["content_sha256"])
    assert first["hashed_files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert first["hash_covers_whole_files"] is True
    assert folder_content_hash(folder) == first
    copy = shutil.copytree(folder, tmp_path / "copy")
    time.sleep(0.01)
    (copy / "config.json").touch()  # a copy with new times is the same model
    assert folder_content_hash(copy)["content_sha256"] == first["content_sha256"]
    (folder / "notes.md").write_text("edited")  # not a model file
    assert folder_content_hash(folder)["content_sha256"] == first["content_sha256"]


def test_folder_hash_changes_with_any_model_file(tmp_path):
    folder = _model_folder(tmp_path / "model")
    original = folder_content_hash(folder)["content_sha256"]
    (folder / "model.safetensors").write_bytes(b"\x00\x02" * 1000)  # same size, one byte pattern differs
    changed_weights = folder_content_hash(folder)["content_sha256"]
    assert changed_weights != original
    (folder / "tokenizer.json").rename(folder / "tokenizer2.json")  # names are part of the hash
    assert folder_content_hash(folder)["content_sha256"] not in (original, changed_weights)


def test_model_lineage_of_a_folder_and_of_an_unreachable_hub_id(tmp_path):
    folder = _model_folder(tmp_path / "model")
    record = model_lineage("demo", str(folder), None)
    assert (record["name_or_path"], record["resolved"], record["revision"]) == ("demo", str(folder), None)
    assert record["content_sha256"] == folder_content_hash(folder)["content_sha256"]
    started = time.time()
    offline = model_lineage("someone/some-model", "someone/some-model", "main")  # HF_HUB_OFFLINE (conftest)
    assert "commit" not in offline and offline["commit_error"], "lineage records why, and never fails a run"
    assert time.time() - started < 10


def test_software_lineage_names_versions_and_the_commit():
    software = software_lineage()
    assert software["loralab_version"] == __version__
    assert set(software["packages"]) == set(PACKAGES)
    for package in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        assert re.match(r"\d+\.\d+", software["packages"][package]), package
    git = software["loralab_git"]
    assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
