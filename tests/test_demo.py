"""The offline demo's shipped base: checked by its manifest, made by the recipe in engine/demo_pretrain.py."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import demo, demo_pretrain
from engine.errors import ModelNotFoundError


def test_the_shipped_base_matches_its_manifest_and_was_measured():
    folder = demo.ensure_demo_model()
    manifest = json.loads((folder / demo.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "tokenizer.json", "config.json"}
    assert (folder / "model.safetensors").stat().st_size < 5 * 2**20  # small enough to ship in git
    skills = manifest["skills"]
    # The base reads sentences (copies every word it is asked for) but has never seen the JSON task.
    assert min(skills[task] for task in demo_pretrain.COPY_TASKS) >= 0.95 and skills["extract_json"] == 0.0
    assert manifest["recipe"]["stages"] == json.loads(json.dumps(demo_pretrain.RECIPE["stages"]))


def test_a_changed_weight_file_is_refused_in_words(tmp_path):
    copy = tmp_path / "demo-model"
    shutil.copytree(demo.SHIPPED_MODEL_DIR, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ModelNotFoundError, match="model.safetensors .* sha256 differs"):
        demo.verify_demo_model(copy)
    (copy / demo.MANIFEST).unlink()
    with pytest.raises(ModelNotFoundError, match="no readable manifest"):
        demo.verify_demo_model(copy)


def test_every_world_word_is_one_token_wherever_it_stands():
    """Why the base can copy: 'cup' in a sentence and '"cup"' in an answer are the same id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.ensure_demo_model())
    for word in demo.SIZES + demo.COLORS + demo.OBJECTS + demo.RELATIONS + demo.PLACES:
        (alone,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        in_sentence = tokenizer(f"the big red {word} is on it.", add_special_tokens=False)["input_ids"]
        quoted = tokenizer(f'{{"object": "{word}"}}', add_special_tokens=False)["input_ids"]
        assert alone in in_sentence and alone in quoted, word


def test_the_recipe_trains_and_writes_a_verifiable_folder(tmp_path):
    """A two-stage miniature of the shipped recipe: losses fall, collapsed words are split, the manifest verifies."""
    recipe = {"dimensions": {**demo.MODEL_DIMENSIONS, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1},
              "stages": [{"lr": 3e-3, "batch": 4, "phases": [{"steps": 6, "tasks": {"repeat": 1, "color": 1}}]},
                         {"lr": 1e-3, "batch": 4, "rng_seed": 7, "split_collapsed": 0.0,
                          "phases": [{"steps": 4, "tasks": {"form": 1}}]}]}
    logged = []
    model, tokenizer, history = demo_pretrain.pretrain(recipe, seed=1, log=logged.append)
    assert [entry["step"] for entry in history] == [6, 10] and history[0]["stage"] == 0 and history[1]["stage"] == 1
    split = [json.loads(line) for line in logged if "split_collapsed_words" in line]
    assert split and split[0]["split_collapsed_words"]  # threshold 0: every pair counts as collapsed
    target = demo_pretrain.save_weights(model, tokenizer, tmp_path / "base", {"recipe": recipe},
                                        log=lambda *_: None, skill_count=4)
    assert demo.verify_demo_model(target) == target
    assert set(json.loads((target / demo.MANIFEST).read_text())["skills"]) >= set(demo_pretrain.TASKS)
