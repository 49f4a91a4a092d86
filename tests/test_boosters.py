"""Speed boosters: padding-free and packed batches, Liger kernels, the attention kernel.

* padding-free batches train the same loss as padded ones on every attention path the CPU
  has (sdpa and eager get transformers 5's block-diagonal mask from the position ids), and a
  flattened batch *without* position ids does not (so the comparison can fail);
* padding-free without packing keeps rows truncated at max_length (TRL's own collator);
* what this machine cannot run falls back with a sentence (FlashAttention 2, Liger);
* the config, the command line and the form carry the switches; the worker logs them.
"""

from __future__ import annotations

import pytest

from engine.config import load_preset
from engine.config.build import (
    boosters, boosters_line, decide_runtime, is_padding_free, model_load_kwargs, to_data_collator, to_lora_config,
    to_sft_config,
)


def _rows(n: int) -> list[dict]:
    """Rows of varied lengths (the demo's own rows are all about as long), so padded batches carry padding."""
    from bench.boosters import varied_rows

    return varied_rows(n, seed=3)


def _trainer(model_dir, tmp_path, overrides: list[str], rows: list[dict]):
    """An SFTTrainer built exactly as the worker builds one (engine.config.build), without training."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    config = load_preset("demo-lora", ["train.max_steps=1", "train.per_device_eval_batch_size=6", *overrides])
    runtime = decide_runtime(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(config, runtime))
    args = to_sft_config(config, runtime, tmp_path / "out", has_eval=True)
    dataset = Dataset.from_list(rows)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
                      peft_config=to_lora_config(config), data_collator=to_data_collator(config, runtime, tokenizer))


def test_padding_free_trains_the_same_loss_as_padded_batches_on_sdpa_and_eager(demo_model_dir, tmp_path):
    import torch

    torch.manual_seed(0)
    rows = _rows(18)
    losses = {}
    for attn in ("sdpa", "eager"):
        for padding_free in (False, True):
            trainer = _trainer(demo_model_dir, tmp_path, [f"model.attn_implementation={attn}",
                                                         f"train.padding_free={str(padding_free).lower()}"], rows)
            losses[attn, padding_free] = trainer.evaluate()["eval_loss"]
            batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(6)])
            if padding_free:
                assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
                assert int((batch["position_ids"][0] == 0).sum()) == 6  # one position reset per row
            else:
                assert not batch["attention_mask"].all(), "the rows differ in length, so padded batches pad"
    print("eval loss:", {f"{a} {'padding-free' if p else 'padded'}": round(v, 6) for (a, p), v in losses.items()})
    reference = losses["sdpa", False]
    for key, value in losses.items():
        assert value == pytest.approx(reference, rel=1e-4), (key, losses)

    # The same flattened batch without position ids lets rows attend across their boundaries:
    # the loss moves, so the equality above is a real check of the block-diagonal mask.
    model = trainer.model.eval()
    with torch.no_grad():
        kept = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        fused = model(**kept, fused_lm_head=True)
        blended = model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True)
    mean = lambda out: float(-out.log_probs.sum() / out.label_mask.sum())
    assert abs(mean(blended) - mean(fused)) > 1e-3 * mean(fused)


def test_padding_free_without_packing_keeps_max_length_and_flattens(demo_model_dir, tmp_path):
    trainer = _trainer(demo_model_dir, tmp_path, ["train.padding_free=true", "train.max_length=64"], _rows(12))
    assert not trainer.args.padding_free and trainer.data_collator.padding_free  # see to_data_collator
    lengths = [len(row["input_ids"]) for row in trainer.train_dataset]
    assert max(lengths) == 64, "rows longer than max_length are truncated by TRL's dataset preparation"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == (1, sum(lengths[:4]))
    assert batch["position_ids"][0].tolist()[:lengths[0] + 1] == list(range(lengths[0])) + [0]


def test_packing_uses_trls_best_fit_decreasing_and_is_padding_free(demo_model_dir, tmp_path):
    trainer = _trainer(demo_model_dir, tmp_path, ["train.packing=true", "train.max_length=128"], _rows(12))
    assert trainer.args.packing_strategy == "bfd" and trainer.padding_free
    assert to_data_collator(load_preset("demo-lora", ["train.packing=true"]), decide_runtime(
        load_preset("demo-lora", ["train.packing=true"])), None) is None  # TRL builds it itself
    assert len(trainer.train_dataset) < 12 and "seq_lengths" in trainer.train_dataset.column_names
    assert all(len(row["input_ids"]) <= 128 for row in trainer.train_dataset)


def test_what_the_cpu_cannot_run_falls_back_in_words():
    config = load_preset("demo-lora", ["model.attn_implementation=flash_attention_2", "train.use_liger_kernel=true",
                                       "train.padding_free=true"])
    runtime = decide_runtime(config)
    assert runtime.device == "cpu"
    assert (runtime.attn_implementation, runtime.use_liger_kernel, runtime.padding_free) == ("sdpa", False, True)
    assert any("FlashAttention 2 needs a CUDA GPU: using sdpa" in s for s in runtime.fallbacks)
    assert any("Liger kernels" in s and "CUDA" in s for s in runtime.fallbacks)
    assert model_load_kwargs(config, runtime)["attn_implementation"] == "sdpa"
    args = to_sft_config(config, runtime, "/tmp/unused", has_eval=False)
    assert args.use_liger_kernel is False
    # Told it has a GPU, it names the missing packages instead (none of them is installed here).
    on_gpu = decide_runtime(config, device="cuda")
    assert any("flash-attn" in s for s in on_gpu.fallbacks), on_gpu.fallbacks
    assert any("triton" in s and "liger-kernel" in s for s in on_gpu.fallbacks), on_gpu.fallbacks
    # What needs nothing special is kept, with no sentence.
    plain = decide_runtime(load_preset("demo-lora", ["model.attn_implementation=eager", "train.packing=true"]))
    assert plain.attn_implementation == "eager" and plain.padding_free
    assert not any("attention" in s or "Liger" in s for s in plain.fallbacks)


def test_config_carries_the_switches_and_says_which_are_on():
    config = load_preset("demo-lora", ["train.packing=true", "train.packing_strategy=wrapped"])
    assert not is_padding_free(config), "wrapped packing cuts rows and keeps padded batches"
    assert boosters(config) == ["packing (wrapped)"]
    assert boosters_line(load_preset("demo-lora")) == "Boosters: none (padded batches, sdpa attention)."
    line = boosters_line(load_preset("demo-lora", ["train.padding_free=true", "train.use_liger_kernel=true"]))
    assert line == "Boosters: padding-free · Liger kernels · sdpa attention."
    errors = load_preset("demo-lora", ["train.packing_strategy=bfd-requeue"]).errors()
    assert [e.field for e in errors] == ["train.packing_strategy"] and "bfd_split" in str(errors[0])


def test_fast_preset_turns_every_booster_on():
    config = load_preset("qlora-fast").validate()
    assert config.method == "qlora"
    assert config.model.attn_implementation == "flash_attention_2"
    assert config.train.use_liger_kernel and config.train.packing and config.train.packing_strategy == "bfd"
    assert is_padding_free(config)


def test_train_form_shows_the_boosters():
    from ui.train_tab import FIELD_NAMES, boosters_markdown, config_to_values

    for name in ("model.attn_implementation", "train.padding_free", "train.packing", "train.packing_strategy",
                 "train.use_liger_kernel"):
        assert name in FIELD_NAMES
    config = load_preset("demo-lora", ["train.padding_free=true"])
    assert boosters_markdown("demo-lora", config.method, *config_to_values(config)) == \
        "Boosters: padding-free · sdpa attention."
    values = dict(zip(FIELD_NAMES, config_to_values(config)), **{"train.packing_strategy": "nope"})
    assert boosters_markdown("demo-lora", "lora", *values.values()).startswith("Boosters:")  # never a traceback
    values["lora.target_modules"] = []  # a form the engine cannot even read
    assert boosters_markdown("demo-lora", "lora", *values.values()).startswith("Boosters")


@pytest.mark.slow
def test_worker_trains_packed_padding_free_and_logs_the_boosters(demo_model_dir, tmp_path):
    from engine.training import rundir
    from tests.conftest import run_preset_to_end

    run_dir = run_preset_to_end(tmp_path, "demo-lora", ["train.max_steps=4", "train.packing=true",
                                                         "train.per_device_train_batch_size=2", "train.eval_steps=4",
                                                         "train.save_steps=4", "train.use_liger_kernel=true"])
    status = rundir.read_status(run_dir)
    assert status["state"] == "completed", rundir.log_tail(run_dir)
    log = rundir.log_tail(run_dir, 400)
    assert "Boosters: packing (bfd) · padding-free (implied by packing) · Liger kernels" in log
    assert any("Liger" in s for s in status["fallbacks"])
