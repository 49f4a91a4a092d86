"""The Chat tab's engine: one base in memory, both sides streaming, stop, prompt sets, ratings, CLI.

Uses the session's real demo-lora training run (conftest ``demo_lora_run``), copied so
that ratings written here do not touch it.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from engine.chat import (
    BASE,
    FINETUNED,
    ChatModels,
    Sampling,
    adapter_options,
    held_out_prompts,
    prompts_from_file,
    prompts_from_lines,
    resolve_adapter,
    source_for_folder,
    source_for_run,
    token_f1,
)
from engine.chat.cli import main as cli_main
from engine.chat.ratings import make_blind_items, read_ratings, record_rating, win_rate
from engine.errors import ConfigError, DataError, ModelNotFoundError, RunError

DEMO_PROMPT = [{"role": "user", "content": "Extract as JSON: the big red apple is on the table."}]


def copy_run(run_dir: Path, runs_dir: Path, name: str | None = None) -> Path:
    target = runs_dir / (name or run_dir.name)
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state.pth"))
    return target


@pytest.fixture(scope="module")
def chat_run(demo_lora_run, tmp_path_factory) -> Path:
    return copy_run(demo_lora_run, tmp_path_factory.mktemp("chat-runs"))


@pytest.fixture(scope="module")
def loaded(chat_run) -> ChatModels:
    models = ChatModels()
    models.load(source_for_run(chat_run))
    return models


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "chat-generate" and t.is_alive()]


# ----------------------------------------------------------------------------- one base, several adapters
def test_base_is_loaded_once_for_both_sides_and_several_adapters(chat_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    checkpoints = [value for _, value in adapter_options(chat_run) if value.startswith("checkpoint-")]
    assert checkpoints, "the demo run saves checkpoints"

    models = ChatModels()
    models.load(source_for_run(chat_run))
    final = list(models.stream_pair(DEMO_PROMPT, DEMO_PROMPT, Sampling(greedy=True, max_new_tokens=16)))[-1]
    models.load(source_for_run(chat_run, checkpoints[-1]))
    models.answer(DEMO_PROMPT, FINETUNED, Sampling(greedy=True, max_new_tokens=16))
    models.load(source_for_run(chat_run))  # back to the first adapter: already in memory
    again = list(models.stream_pair(DEMO_PROMPT, DEMO_PROMPT, Sampling(greedy=True, max_new_tokens=16)))[-1]

    assert len(loads) == 1 and models.base_loads == 1
    assert len(models.model.peft_config) == 2  # both adapters live on the one base
    assert again == final  # switching away and back restores the same adapter
    assert "read from disk once" in models.describe()
    assert checkpoints[-1] in models.describe()  # named as switchable


def test_latest_adapter_of_a_running_run_is_its_newest_checkpoint(chat_run, tmp_path):
    from engine.training.rundir import hold_worker_lock, update_status

    running = copy_run(chat_run, tmp_path)
    newest = max((p for p in (running / "checkpoints").glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    with hold_worker_lock(running):  # this test plays its live worker (a recorded state alone is not life)
        update_status(running, "training")
        assert source_for_run(running).path == newest
    assert source_for_run(chat_run).path == chat_run / "adapter"  # completed: the final save
    assert source_for_run(chat_run, newest.name.split("-")[1]).path.name == newest.name


# ----------------------------------------------------------------------------- the comparison itself
def test_finetuned_answers_differ_from_base_and_are_closer_to_the_reference(loaded, chat_run):
    prompts = held_out_prompts(chat_run)[:8]
    rows = list(loaded.compare(prompts, Sampling(greedy=True, max_new_tokens=64)))
    assert len(rows) == 8 and all(row.reference for row in rows)
    assert all(row.base != row.finetuned for row in rows)
    base_f1 = sum(row.base_f1 for row in rows) / len(rows)
    tuned_f1 = sum(row.finetuned_f1 for row in rows) / len(rows)
    print(f"token F1 against the reference, 8 held-out prompts: base {base_f1:.3f}, fine-tuned {tuned_f1:.3f}")
    assert tuned_f1 > base_f1 + 0.2
    assert sum(row.finetuned_f1 > row.base_f1 for row in rows) >= 6


def test_same_seed_gives_the_same_sampled_answers_and_streams_grow(loaded):
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=11, max_new_tokens=24)
    first = list(loaded.stream_pair(DEMO_PROMPT, DEMO_PROMPT, sampling))
    second = list(loaded.stream_pair(DEMO_PROMPT, DEMO_PROMPT, sampling))
    assert first[-1] == second[-1]
    assert first[-1] == (loaded.answer(DEMO_PROMPT, BASE, sampling), loaded.answer(DEMO_PROMPT, FINETUNED, sampling))
    # Streamed token by token: each side's text grows by prefixes over many updates.
    for side in (0, 1):
        texts = [update[side] for update in first if update[side]]
        assert len(set(texts)) >= 3
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_sampling_settings_are_checked():
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0).validated()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        Sampling(max_new_tokens=0).validated()
    assert Sampling(temperature=0).generate_kwargs()["do_sample"] is False  # temperature 0 means greedy
    assert Sampling(greedy=True).describe().startswith("greedy")


# ----------------------------------------------------------------------------- stop
def test_stop_during_the_base_side_ends_both_within_a_second(loaded):
    long = Sampling(temperature=1.0, max_new_tokens=4000, min_new_tokens=4000)
    stop = threading.Event()
    stream = loaded.stream_pair(DEMO_PROMPT, DEMO_PROMPT, long, stop)
    last = next(stream)
    started = time.monotonic()
    stop.set()
    for pair in stream:  # drain; the last pair is what the user sees
        last = pair
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert last[1] == ""  # the fine-tuned side never started
    assert len(loaded.tokenizer(last[0])["input_ids"]) < 4000
    assert loaded.generating == 0 and not generation_threads()


def test_stop_during_the_finetuned_side_ends_it_within_a_second(loaded):
    sampling = Sampling(temperature=1.0, max_new_tokens=300, min_new_tokens=300)
    stop = threading.Event()
    last = None
    for last in loaded.stream_pair(DEMO_PROMPT, DEMO_PROMPT, sampling, stop):
        if last[1] and not stop.is_set():
            stop.set()
            started = time.monotonic()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    # 300 new tokens do not fit the demo model's 256 positions: both sides get what fits (ChatModels.fit).
    fitted, note = loaded.fit([DEMO_PROMPT], sampling)
    assert note and fitted.max_new_tokens < 300
    # (Re-tokenizing decoded text only roughly recovers the generated tokens.)
    base_tokens, tuned_tokens = (len(loaded.tokenizer(text)["input_ids"]) for text in last)
    assert base_tokens >= 0.8 * fitted.max_new_tokens  # the base side had finished
    assert 0 < tuned_tokens < 0.8 * base_tokens
    assert loaded.generating == 0 and not generation_threads()


def test_abandoning_the_stream_stops_generation(loaded):
    stream = loaded.stream_pair(DEMO_PROMPT, DEMO_PROMPT, Sampling(max_new_tokens=4000, min_new_tokens=4000))
    next(stream)
    stream.close()  # what a closed browser tab does to the UI generator
    deadline = time.monotonic() + 1.0
    while generation_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not generation_threads() and loaded.generating == 0


# ----------------------------------------------------------------------------- load state and errors
def test_load_state_is_described_in_words(loaded, chat_run):
    text = loaded.describe()
    assert "Base model demo" in text and "CPU" in text and "float32" in text
    assert f"{chat_run.name} / adapter" in text and "MiB" in text


def test_run_without_adapter_says_so(tmp_path):
    from engine.config import load_preset
    from engine.training.rundir import create_run

    create_run(tmp_path, load_preset("demo-lora"), name="fresh")
    with pytest.raises(RunError, match="has no adapter yet"):
        resolve_adapter(tmp_path, "fresh")
    with pytest.raises(RunError, match="No run named 'missing'"):
        resolve_adapter(tmp_path, "missing")


def test_base_not_found_offline_fails_fast(chat_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "orphan-adapter"
    shutil.copytree(chat_run / "adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody-here/never-downloaded-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    models = ChatModels()
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="never-downloaded-model.*HF_HUB_OFFLINE"):
        models.load(source_for_folder(folder))
    assert time.monotonic() - started < 5
    assert not models.loaded and models.base_loads == 0


def test_adapter_folder_inside_a_run_rates_into_the_run(chat_run):
    source = source_for_folder(chat_run / "adapter")
    assert source.run_dir == chat_run and source.ratings_path == chat_run / "ratings.jsonl"


def test_quantized_run_is_chatted_on_a_4bit_base(chat_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from engine.training.rundir import load_config

    run = copy_run(chat_run, tmp_path, "qlora-copy")
    config = load_config(run)
    config.set_method("qlora")
    config.quant.bnb_4bit_compute_dtype = "float32"
    config.save(run / "config.yaml")
    models = ChatModels()
    text = models.load(source_for_run(run))
    assert "4-bit NF4" in text
    assert any(type(m).__name__ == "Linear4bit" for m in models.model.modules())
    pair = list(models.stream_pair(DEMO_PROMPT, DEMO_PROMPT, Sampling(greedy=True, max_new_tokens=24)))[-1]
    assert pair[0] and pair[1] and pair[0] != pair[1]


# ----------------------------------------------------------------------------- prompt sets
def test_prompt_sets_from_files_lines_and_the_held_out_split(chat_run, tmp_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\n  second prompt  \n")
    assert [p.text for p in prompts_from_file(text_file)] == ["first prompt", "second prompt"]
    assert [p.text for p in prompts_from_lines("a\n\n b ")] == ["a", "b"]

    with_answers = tmp_path / "answers.jsonl"
    with_answers.write_text(json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}) + "\n")
    items = prompts_from_file(with_answers)
    assert [(i.text, i.reference) for i in items] == [("hi", "hello")]
    assert items[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,output\nadd,1+1,2\n")
    assert [(i.text, i.reference) for i in prompts_from_file(alpaca)] == [("add\n\n1+1", "2")]

    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "only a question"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "turn"}]}) + "\n")
    assert [(i.text, i.reference) for i in prompts_from_file(bare)] == [("only a question", None), ("turn", None)]

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        prompts_from_file(broken)

    held_out = held_out_prompts(chat_run)
    from engine.demo import demo_dataset_path

    eval_rows = demo_dataset_path("eval").read_text().splitlines()
    assert len(held_out) == len(eval_rows)
    assert held_out[0].reference == json.loads(eval_rows[0])["messages"][-1]["content"]


def test_token_f1():
    assert token_f1('{"a": "b"}', '{"a": "b"}') == 1.0
    assert token_f1("nothing shared", "at all") == 0.0
    assert 0 < token_f1('{"size": "big"}', '{"size": "small"}') < 1


# ----------------------------------------------------------------------------- ratings
def test_blind_ratings_are_written_and_read_back(tmp_path):
    rows = [{"prompt": f"prompt {i}", "base": f"base answer {i}", "finetuned": f"tuned answer {i}",
             "reference": None} for i in range(6)]
    items = make_blind_items(rows, random.Random(3))
    assert {item.a_side for item in items} == {BASE, FINETUNED}  # the order really is shuffled
    for item in items:  # the shown letters carry the right answers
        assert (item.answer_a if item.a_side == FINETUNED else item.answer_b).startswith("tuned")
    choices = []
    for index, item in enumerate(items):
        tuned_letter = "A" if item.a_side == FINETUNED else "B"
        base_letter = "B" if tuned_letter == "A" else "A"
        choices.append(tuned_letter if index < 3 else base_letter if index < 5 else "both bad")
    sampling = Sampling(greedy=True).as_dict()
    for item, choice in zip(items, choices):
        record_rating(tmp_path / "ratings.jsonl", item, choice, sampling=sampling, adapter="a", base_model="demo")

    records = read_ratings(tmp_path)
    assert [r["winner"] for r in records] == [FINETUNED] * 3 + [BASE] * 2 + ["both_bad"]
    assert [r["prompt"] for r in records] == [f"prompt {i}" for i in range(6)]
    assert all(r["sampling"]["greedy"] is True and r["time"] > 0 and r["a_side"] in (BASE, FINETUNED)
               for r in records)
    assert win_rate(tmp_path) == (0.5, 3, 6)
    with pytest.raises(RunError, match="not a rating"):
        record_rating(tmp_path / "ratings.jsonl", items[0], "C")
    assert win_rate(tmp_path / "no-such-run") == (None, 0, 0)


# ----------------------------------------------------------------------------- command line
def test_compare_cli_json_and_text(chat_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Extract as JSON: the small blue cup is under the bed.\nRepeat: the big red box.\n")
    code = cli_main([chat_run.name, "--runs-dir", str(chat_run.parent), "--prompts", str(prompts), "--greedy",
                     "--json", "--max-new-tokens", "24"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in document["results"]] == prompts.read_text().splitlines()
    assert all(r["base"] and r["finetuned"] and r["reference"] is None for r in document["results"])
    assert document["sampling"]["greedy"] is True

    code = cli_main([str(chat_run), "--limit", "2", "--greedy", "--max-new-tokens", "48"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and "--- reference ---" in out and "token F1" in out

    assert cli_main(["no-such-run", "--runs-dir", str(tmp_path)]) == 2
    assert "error: No run named 'no-such-run'" in capsys.readouterr().err
