"""What a run was made from: base model identity, software versions, LoRA Lab's commit.

The seeds ask that base model version, adapter version, prompt template and eval report
travel together as one deploy unit; this module computes the identity half of that.
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

from engine import __version__

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "gradio")
FULL_HASH_LIMIT = 2 * 1024**3  # hash whole files up to 2 GiB; sample larger ones (said so in the record)
SAMPLE_BYTES = 64 * 1024**2


def file_sha256(path: Path) -> tuple[str, bool]:
    """sha256 of a file, and whether it covers the whole file (large shards are sampled)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest(), True
        digest.update(handle.read(SAMPLE_BYTES))
        handle.seek(size - SAMPLE_BYTES)
        digest.update(handle.read(SAMPLE_BYTES))
        digest.update(str(size).encode())
        return digest.hexdigest(), False


def folder_content_hash(folder: Path) -> dict:
    """One hash over the model's config, tokenizer and weight files, names included."""
    combined = hashlib.sha256()
    complete = True
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt"))
    for path in files:
        file_hash, whole = file_sha256(path)
        complete &= whole
        combined.update(path.name.encode() + b"\0" + file_hash.encode())
    return {"content_sha256": combined.hexdigest(), "hashed_files": [p.name for p in files],
            "hash_covers_whole_files": complete}


def model_lineage(name: str, resolved: str, revision: str | None) -> dict:
    record = {"name_or_path": name, "resolved": resolved, "revision": revision}
    path = Path(resolved)
    if path.is_dir():
        record.update(folder_content_hash(path))
    else:
        try:
            from huggingface_hub import HfApi

            record["commit"] = HfApi().model_info(resolved, revision=revision, timeout=5).sha
        except Exception as error:  # noqa: BLE001 - lineage must not fail a run
            record["commit_error"] = str(error).splitlines()[0][:200]
    return record


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if head.returncode != 0:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def software_lineage() -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"loralab_version": __version__, "loralab_git": git_commit(), "packages": versions}
