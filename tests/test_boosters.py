"""Speed boosters: padding-free and packed batches, Liger kernels, the attention kernel.

* padding-free batches give the same loss as padded ones on every attention path the CPU
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
    boosters,
    boosters_line,
    decide_runtime,
    is_padding_free,
    model_load_kwargs,
    to_data_collator,
    to_lora_config,
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


def test_padding_free_gives_the_same_loss_as_padded_batches_on_sdpa_and_eager(demo_model_dir, tmp_path):
    import torch

    torch.manual_seed(0)
    rows = _rows(18)
    losses = {}
    for attn in ("sdpa", "eager"):
        trainer = _trainer(demo_model_dir, tmp_path, [f"model.attn_implementation={attn}"], rows)
        padded_collator = trainer.data_collator
        free = load_preset("demo-lora", [f"model.attn_implementation={attn}", "train.padding_free=true"])
        free_collator = to_data_collator(free, decide_runtime(free), trainer.processing_class)
        for padding_free, collator in ((False, padded_collator), (True, free_collator)):
            trainer.data_collator = collator  # the same model and rows, batched both ways
            losses[attn, padding_free] = trainer.evaluate()["eval_loss"]
            batch = collator([trainer.eval_dataset[i] for i in range(6)])
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


# ----------------------------------------------------------------------------- bench/gpu_check.sh
def test_gpu_check_without_a_gpu_says_so_and_exits_zero():
    import os
    import subprocess

    from tests.conftest import PROJECT_ROOT

    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No CUDA GPU here") and "tests/test_memory.py" in done.stdout


def test_gpu_check_plan_covers_the_issue_and_prints_predictions():
    import subprocess
    import sys

    from bench.gpu_check import plan
    from tests.conftest import PROJECT_ROOT

    rows = plan()
    sections = [r["section"] for r in rows]
    calculator = [r for r in rows if r["section"] in ("method", "calculator", "paged optimizer")]
    assert sections.count("method") == 2 and len(calculator) >= 6
    varied = {(r["settings"]["method"], r["settings"]["seq_len"], r["settings"]["gradient_checkpointing"],
               r["settings"]["batch_size"]) for r in calculator}
    assert len(varied) >= 6  # method, sequence length, checkpointing and batch all move
    assert any(r["settings"]["optimizer"].startswith("paged_") for r in rows)
    boosters = {r["label"] for r in rows if r["section"] == "boosters"}
    assert {"padded (sdpa)", "padding-free (sdpa)", "packed bfd (sdpa)", "padding-free + flash_attention_2",
            "padded + Liger kernels"} <= boosters
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "dry run: predicted torch" in line]
    assert len(lines) == len(rows)
    assert any("will skip: flash-attn is not installed" in line for line in lines)


def test_gpu_check_table_and_summary_from_measurements():
    from bench.gpu_check import arch_for, format_row, plan, prediction, summary_lines

    arch = arch_for(False)
    specs = {r["label"]: r for r in plan()}
    qlora, padded, free = specs["QLoRA, 2048 x 2, ckpt on"], specs["padded (sdpa)"], specs["padding-free (sdpa)"]
    predicted = prediction(arch, qlora)
    measured = {"torch_peak": predicted.peak_allocated_bytes / 1.1, "nvml_peak": predicted.nvidia_smi_bytes,
                "sampler_peak": predicted.nvidia_smi_bytes * 0.98, "tokens_per_s": 5000.0, "shapes": [[2, 2048]]}
    line = format_row(qlora, measured, predicted)
    assert "+10.0%" in line and " 5000 " in line
    boosted = {"torch_peak": 2 * 2**30, "nvml_peak": 3 * 2**30, "tokens_per_s": 9000.0, "shapes": [[1, 3000]]}
    base = {"torch_peak": 4 * 2**30, "nvml_peak": 5 * 2**30, "tokens_per_s": 6000.0, "shapes": [[4, 2048]]}
    # Varied rows are predicted for the widest batch actually run (padding-free: one row of its tokens).
    assert prediction(arch, free, [[1, 3000]]).settings["seq_len"] == 3000
    rows = [(qlora, measured, predicted), (padded, base, prediction(arch, padded, base["shapes"])),
            (free, boosted, prediction(arch, free, boosted["shapes"])),
            (specs["padded + Liger kernels"], {"skipped": "skipped: liger-kernel is not installed"}, None)]
    text = "\n".join(summary_lines(rows))
    assert "padding-free (sdpa): 1.50x padded tokens/s, torch peak 0.50x" in text
    assert "GpuSampler" in text and "worst difference 2.0%" in text
    assert "skipped: liger-kernel" in format_row(*rows[3])


@pytest.mark.slow
def test_gpu_check_pipeline_runs_on_the_cpu_with_a_tiny_model():
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--steps", "3"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("method", "boosters"))]
    assert len(rows) == 2 and not any("failed" in row for row in rows), done.stdout
    assert all("sampler: process_rss" in row for row in rows)  # the real sampler, on its CPU fallback
    assert "widest batch 1 x" in rows[1]  # padding-free rows through TRL's collator


# ----------------------------------------------------------------------------- start-up
def test_train_plots_are_served_empty_and_filled_by_the_first_tick(tmp_path):
    import gradio as gr

    from ui import train_tab
    from ui.context import AppContext

    ctx = AppContext(runs_dir=tmp_path, exports_dir=tmp_path)
    with gr.Blocks():
        train_tab.build(ctx)
    monitor = train_tab.Monitor(ctx)
    status, loss, memory, lr, speed, log, key = train_tab.on_tick(ctx, monitor, train_tab.WATCH_LATEST, "")
    assert "No runs yet" in status and key == train_tab.NO_RUN
    for figure in (loss, lr, speed):
        assert [a.text for a in figure.layout.annotations] == ["No metrics yet"]
    again = train_tab.on_tick(ctx, monitor, train_tab.WATCH_LATEST, key)
    assert again[1] == again[3] == again[4] == gr.skip()  # nothing resent while there is still no run
