"""The loss mask shown is the one TRL's SFTTrainer trains on; the figures match direct counts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.data.load import load_dataset_rows
from engine.data.preview import CUT_OFF, TRAINED, encode_row, render_segments, training_template
from engine.data.stats import compute_token_stats, length_histogram, steps_per_epoch
from engine.errors import DataError
from tests.data import tiny_tokenizer

DATA = Path(__file__).parent / "data"
MAX_LENGTH = 48


def _load_support():
    return tiny_tokenizer


support = _load_support()

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "It is four."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour."},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Good morning, ça va ?"},
        ]
    },
    # long enough to be cut inside the assistant turn
    {"messages": [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": "The ball " * 12}]},
    # the prompt alone fills max_length: nothing left to train on, TRL drops it
    {"messages": [{"role": "user", "content": "red ball " * 30}, {"role": "assistant", "content": "Yes."}]},
]


def tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def sft_trainer(tokenizer, rows, tmp_path, assistant_only_loss=True, max_length=MAX_LENGTH, **overrides):
    """The worker's setup: SFTTrainer on a conversational dataset with assistant-only loss."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = dict(
        output_dir=str(tmp_path / "out"), assistant_only_loss=assistant_only_loss, max_length=max_length,
        report_to="none", use_cpu=True, bf16=False, shuffle_dataset=False, save_strategy="no",
        disable_tqdm=True,
    )
    args.update(overrides)
    return SFTTrainer(
        model=tiny_model(len(tokenizer)),
        args=SFTConfig(**args),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def collator_labels(trainer):
    """(input_ids, labels) per example, as the data collator hands them to the model."""
    out = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([{"input_ids": example["input_ids"], "labels": example["labels"]}])
        out.append((batch["input_ids"][0].tolist(), batch["labels"][0].tolist()))
    return out


def tokenizers():
    from trl.chat_template_utils import qwen2_5_chat_template

    return {
        # a template with {% generation %} markers: TRL uses it as it is
        "chatml-with-markers": support.build_tiny_tokenizer(),
        # a known template without markers: TRL swaps in its training version
        "qwen2.5-without-markers": support.build_tiny_tokenizer(qwen2_5_chat_template),
    }


@pytest.fixture(scope="module", params=["chatml-with-markers", "qwen2.5-without-markers"])
def tokenizer(request):
    return tokenizers()[request.param]


def test_mask_matches_the_labels_sft_trainer_trains_on(tokenizer, tmp_path):
    template = training_template(tokenizer)
    trainer = sft_trainer(tokenizer, ROWS, tmp_path)
    encoded = [encode_row(tokenizer, row, template, MAX_LENGTH) for row in ROWS]
    # TRL drops the rows left with no trained token; we must predict exactly which.
    kept = [e for e in encoded if e.trained_tokens > 0]
    assert len(kept) < len(encoded), "the fixture should include a row TRL drops"
    actual = collator_labels(trainer)
    assert len(actual) == len(kept)
    for ours, (input_ids, labels) in zip(kept, actual):
        assert ours.input_ids[: ours.kept] == input_ids
        assert [label != -100 for label in ours.labels] == [label != -100 for label in labels]
        assert ours.labels == labels
    assert any(e.truncated and e.trained_tokens > 0 for e in kept), "a row cut inside its answer is compared too"


def test_template_origin_mirrors_trl(tokenizer):
    from trl.chat_template_utils import has_generation_markers

    info = training_template(tokenizer)
    if has_generation_markers(tokenizer.chat_template):
        assert info.origin == "tokenizer" and info.chat_template is None
    else:
        assert info.origin == "trl training template" and has_generation_markers(info.chat_template)
    assert info.problem is None


def test_text_rows_match_trl_language_modelling(tmp_path):
    tokenizer = support.build_tiny_tokenizer()
    rows = load_dataset_rows(str(DATA / "text.jsonl")).rows
    trainer = sft_trainer(tokenizer, rows, tmp_path, assistant_only_loss=False, max_length=8)
    template = training_template(tokenizer)
    actual = collator_labels(trainer)
    for row, (input_ids, labels) in zip(rows, actual):
        ours = encode_row(tokenizer, row, template, 8)
        assert ours.input_ids[: ours.kept] == input_ids and ours.labels == labels
        assert ours.truncated


def test_rendered_segments_show_trained_masked_and_cut_off_text():
    tokenizer = support.build_tiny_tokenizer()
    template = training_template(tokenizer)
    row = ROWS[1]
    full = encode_row(tokenizer, row, template, None)
    segments = render_segments(tokenizer, full)
    assert "".join(text for text, _ in segments) == tokenizer.decode(full.input_ids)
    trained_text = [text for text, label in segments if label == TRAINED]
    assert trained_text == ["Bonjour.<|im_end|>", "Good morning, ça va ?<|im_end|>"]
    assert all(label in (None, TRAINED) for _, label in segments)

    cut = encode_row(tokenizer, row, template, 20)
    segments = render_segments(tokenizer, cut)
    assert segments[-1][1] == CUT_OFF
    cut_text = segments[-1][0]
    assert tokenizer.decode(cut.input_ids[20:]) == cut_text


def test_missing_or_unpatchable_chat_template_is_a_sentence():
    no_template = support.build_tiny_tokenizer(chat_template=None)
    info = training_template(no_template)
    assert info.problem and "no chat template" in info.problem
    with pytest.raises(DataError, match="no chat template"):
        encode_row(no_template, ROWS[0], info, 32)
    # text rows need no template
    assert encode_row(no_template, {"text": "a ball"}, info, 32).length > 0

    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    info = training_template(support.build_tiny_tokenizer(chat_template=plain))
    assert info.problem and "generation" in info.problem


def test_statistics_match_a_direct_count():
    tokenizer = support.build_tiny_tokenizer()
    template = training_template(tokenizer)
    rows = ROWS + [ROWS[0], {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}]
    stats = compute_token_stats(rows, tokenizer, MAX_LENGTH, template)

    # direct count, straight from the tokenizer
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    ]
    assert stats.lengths == lengths
    assert stats.rows == len(rows)
    assert stats.total_tokens == sum(lengths) and stats.max_tokens == max(lengths)
    assert stats.mean_tokens == pytest.approx(sum(lengths) / len(rows))
    assert stats.truncated_rows == sum(n > MAX_LENGTH for n in lengths)
    assert stats.tokens_lost == sum(max(0, n - MAX_LENGTH) for n in lengths)
    assert stats.duplicate_rows == 1
    assert stats.empty_rows == 1
    assert stats.no_trainable_rows == 1

    starts, counts = length_histogram(stats.lengths)
    width = starts[1] - starts[0] if len(starts) > 1 else 1
    for start, count in zip(starts, counts):
        assert count == sum(start <= n < start + width for n in lengths)
    assert sum(counts) == len(rows) and starts[0] == min(lengths) and starts[-1] <= max(lengths) < starts[-1] + width


def test_histogram_bins_cover_wide_ranges_with_few_bars():
    lengths = list(range(3, 5000, 7))
    starts, counts = length_histogram(lengths, max_bins=40)
    assert len(counts) <= 40 and sum(counts) == len(lengths)
    width = starts[1] - starts[0]
    assert all(counts[i] == sum(s <= n < s + width for n in lengths) for i, s in enumerate(starts))


@pytest.mark.parametrize("rows, batch, accumulation", [(10, 3, 2), (7, 2, 1), (5, 4, 4)])
def test_steps_per_epoch_matches_the_trainer(rows, batch, accumulation, tmp_path):
    tokenizer = support.build_tiny_tokenizer()
    data = [ROWS[0]] * rows
    trainer = sft_trainer(
        tokenizer, data, tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        num_train_epochs=1, learning_rate=1e-3, logging_strategy="no",
    )
    trainer.train()
    assert trainer.state.global_step == steps_per_epoch(rows, batch, accumulation)
    assert steps_per_epoch(rows, batch, accumulation) == math.ceil(math.ceil(rows / batch) / accumulation)


def test_demo_model_mask_matches_the_trainer(demo_model_dir, tmp_path):
    """The tokenizer the dashboard uses by default, on the bundled demo rows."""
    from engine.data.preview import load_tokenizer

    tokenizer = load_tokenizer("demo")
    rows = load_dataset_rows("demo", limit=4).rows
    template = training_template(tokenizer)
    trainer = sft_trainer(tokenizer, rows, tmp_path, max_length=40)
    kept = [e for e in (encode_row(tokenizer, row, template, 40) for row in rows) if e.trained_tokens]
    actual = collator_labels(trainer)
    assert len(kept) == len(actual) > 0
    for ours, (input_ids, labels) in zip(kept, actual):
        assert ours.input_ids[: ours.kept] == input_ids and ours.labels == labels
