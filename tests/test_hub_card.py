"""Hub-friendly outputs: the model card's metadata as the Hub reads it (huggingface_hub's own parser), and
``engine export --push`` failing within seconds, in words, when it cannot work from here."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from huggingface_hub import ModelCard

from engine.export.card import card_metadata
from tests.conftest import PROJECT_ROOT


def lineage_for(base: dict, train_source: str, eval_loss: float | None = 1.25, kind: str = "adapter") -> dict:
    return {"export": {"name": "my-adapter", "kind": kind}, "base_model": base, "method": "qlora",
            "metrics": {"final_eval_loss": eval_loss},
            "data": {"train": {"source": train_source, "sha256": "0" * 64},
                     "eval": {"held_out_from_train": True, "eval_fraction": 0.1, "num_rows": 20}}}


def parse(lineage: dict):
    return ModelCard(f"---\n{card_metadata(lineage).to_yaml()}\n---\n\n# card\n").data


def test_a_hub_base_gives_base_model_license_datasets_and_a_model_index(tmp_path):
    base_folder = tmp_path / "qwen"
    base_folder.mkdir()
    (base_folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Qwen\n")
    base = {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "resolved": str(base_folder), "commit": "a" * 40}
    data = parse(lineage_for(base, "HuggingFaceH4/no_robots"))
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and data.base_model_relation == "adapter"
    assert data.license == "apache-2.0" and data.library_name == "peft"
    assert data.datasets == ["HuggingFaceH4/no_robots"]
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("loss", 1.25)
    assert result.dataset_type == "HuggingFaceH4/no_robots" and result.dataset_split == "held out from train"
    merged = parse(lineage_for(base, "HuggingFaceH4/no_robots", kind="merged"))
    assert merged.library_name == "transformers" and merged.base_model_relation == "finetune"


def test_local_bases_and_files_are_not_named_as_hub_repos_and_unknowns_are_left_out(tmp_path):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("{}\n")
    base = {"name_or_path": str(tmp_path / "my-model"), "resolved": str(tmp_path / "my-model"),
            "content_sha256": "b" * 64}
    data = parse(lineage_for(base, str(data_file), eval_loss=None))
    assert data.base_model is None and data.license is None and data.datasets is None
    assert data.eval_results is None and data.tags[:2] == ["loralab", "lora"]
    assert parse(lineage_for(base, "data/train.jsonl", eval_loss=None)).datasets is None  # a path, not a repo id


def push(env_changes: dict[str, str | None], repo: str = "someone/my-adapter") -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "engine", "export", "no-such-run", "--push", repo],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=120)
    return done, time.monotonic() - started


NO_TOKEN = {"HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None, "HF_TOKEN_PATH": None}


def test_push_offline_fails_within_seconds_in_words():
    done, seconds = push({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_" + "x" * 34})
    assert done.returncode == 1 and seconds < 15, (done.stderr, seconds)
    assert "HF_HUB_OFFLINE is set, so nothing can be pushed" in done.stderr and "Traceback" not in done.stderr


def test_push_without_a_token_fails_within_seconds_in_words(tmp_path):
    done, seconds = push({"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path), **NO_TOKEN})
    assert done.returncode == 1 and seconds < 15, (done.stderr, seconds)
    assert "No Hugging Face token was found: run `hf auth login` or set HF_TOKEN" in done.stderr


def test_push_to_an_unreachable_hub_fails_within_seconds_in_words(tmp_path):
    done, seconds = push({"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path), "HF_TOKEN": "hf_" + "x" * 34,
                          "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens on the discard port
    assert done.returncode == 1 and seconds < 15, (done.stderr, seconds)
    assert "The Hugging Face Hub (http://127.0.0.1:9) cannot be reached" in done.stderr


@pytest.mark.parametrize("repo", ["just-a-name", "a/b/c", "../evil"])
def test_push_to_something_that_is_not_a_repo_id_is_refused(repo):
    done, _ = push({"HF_HUB_OFFLINE": "1"}, repo=repo)
    assert done.returncode == 1 and "is not a Hub repository id: use owner/name" in done.stderr
