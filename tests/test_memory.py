"""The memory calculator against real tensors, on the CPU.

* parameter and trainable-parameter counts equal a meta-device model wrapped by PEFT, exactly;
* quantized weight bytes equal a tiny model really quantized by bitsandbytes (within 1%);
* activation bytes equal what ``torch.autograd.graph.saved_tensors_hooks`` sees for
  several configurations (checkpointing on and off, two lengths, LoRA, QLoRA, full; the
  issue asks for 10%, the assertion is 2%);
* the predicted peak matches the peak of live tensors over real optimizer steps (5%);
* and the estimator's behaviour: terms add up, the command line, errors, fitting, run configs.

Models are tiny so each test takes seconds on two cores; catalog-sized architectures are
only ever built on the meta device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.errors import ConfigError, ModelNotFoundError
from engine.memory.activations import activation_profile
from engine.memory.arch import (
    ArchitectureIncompleteError,
    arch_from_config,
    arch_from_numbers,
    catalog_entry,
    catalog_ids,
    load_arch,
)
from engine.memory.cli import main as cli_main
from engine.memory.estimator import (
    GPUS,
    MemoryEstimate,
    MemorySettings,
    estimate,
    estimate_for_run_config,
    fits_on_gpus,
    max_batch_or_seq_that_fits,
    parameter_counts,
    quantized_weight_bytes,
    resolve_targets,
    settings_from_run_config,
    trace_plan,
)

ROOT = Path(__file__).resolve().parent.parent


def tiny_arch(model_type: str = "llama", **overrides):
    """A few-layer model of the given family, with GQA, small enough to run in milliseconds."""
    config = dict(model_type=model_type, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if model_type == "gemma2":
        config.update(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, sliding_window=32, hidden_activation="gelu_pytorch_tanh",
                      tie_word_embeddings=True)
    if model_type == "phi3":
        config.update(resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, original_max_position_embeddings=512)
    config.update(overrides)
    return arch_from_config(config, name=f"tiny-{model_type}")


@pytest.fixture(scope="module")
def torch():
    import torch

    torch.set_num_threads(2)
    return torch


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("model_id", catalog_ids())
def test_catalog_dimensions_give_the_published_parameter_count(model_id):
    arch = load_arch(model_id)
    assert arch.total_params == catalog_entry(model_id)["_catalog"]["published_parameters"]


@pytest.mark.parametrize(
    "model_id, settings",
    [
        ("llama-3.2-1b", dict(method="lora", rank=16, targets="all-linear")),
        ("qwen2.5-7b", dict(method="lora", rank=8, targets=["q_proj", "v_proj"])),
        ("gemma-2-2b", dict(method="lora", rank=16, targets="all-linear", dora=True)),
        ("phi-3-mini", dict(method="qlora", rank=8, targets=["qkv_proj", "o_proj"])),
        ("mistral-7b", dict(method="lora", rank=32, targets=r".*\.(q|k|v|o)_proj")),
        ("smollm2-135m", dict(method="full")),
    ],
)
def test_parameter_counts_equal_peft_on_the_meta_device(model_id, settings, torch):
    from bench.memory_harness import meta_parameter_counts

    arch = load_arch(model_id)
    s = MemorySettings(**settings)
    trainable, total = meta_parameter_counts(arch, s)
    predicted = parameter_counts(arch, s)
    assert (predicted["trainable"], predicted["total"]) == (trainable, total)


# ----------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("method, double_quant", [("qlora", True), ("qlora", False), ("lora8bit", False)])
def test_quantized_weight_bytes_match_bitsandbytes(method, double_quant, torch, tmp_path):
    from bench.memory_harness import build_model, quantized_storage_bytes

    # 56 x 150 weights are not a multiple of the 64-weight block: the last block is partial.
    arch = tiny_arch(hidden_size=56, intermediate_size=150, num_attention_heads=4, num_key_value_heads=2)
    s = MemorySettings(method=method, double_quant=double_quant, compute_dtype="float32", gradient_checkpointing=False,
                       device="cpu")
    model = build_model(arch, s, checkpoint_dir=tmp_path)
    measured = quantized_storage_bytes(model)
    packed, constants = quantized_weight_bytes(arch, method, double_quant, block=1)
    assert measured["packed"] > 0
    assert packed == pytest.approx(measured["packed"], rel=0.01)
    assert constants == pytest.approx(measured["constants"], rel=0.01)


# ----------------------------------------------------------------------------- activations
ACTIVATION_CASES = [
    ("llama", dict(method="lora", seq_len=32, gradient_checkpointing=False)),
    ("llama", dict(method="lora", seq_len=96, gradient_checkpointing=False)),
    ("llama", dict(method="lora", seq_len=96, gradient_checkpointing=True)),
    ("llama", dict(method="qlora", seq_len=32, gradient_checkpointing=False)),
    ("llama", dict(method="qlora", seq_len=96, gradient_checkpointing=False)),
    ("llama", dict(method="qlora", seq_len=96, gradient_checkpointing=True)),
    ("llama", dict(method="qlora", seq_len=64, gradient_checkpointing=False, kbit_upcast=False)),
    ("llama", dict(method="full", seq_len=64, gradient_checkpointing=False)),
    ("llama", dict(method="lora", seq_len=64, gradient_checkpointing=False, lora_dropout=0.1,
                   targets=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(method="lora", seq_len=64, gradient_checkpointing=False, padded=True, loss="full_logits")),
    ("llama", dict(method="lora", seq_len=64, gradient_checkpointing=False, attn="eager", dora=True)),
    ("qwen2", dict(method="qlora", seq_len=64, gradient_checkpointing=False)),
    ("gemma2", dict(method="lora", seq_len=64, gradient_checkpointing=False, loss="full_logits")),
    ("phi3", dict(method="qlora", seq_len=64, gradient_checkpointing=False)),
    ("phi3", dict(method="full", seq_len=64, gradient_checkpointing=True)),
    # Padding-free batches (TRL's collator: one row of all tokens, per-row position ids): sdpa and
    # eager get transformers' block-diagonal mask; with checkpointing, a QLoRA base and GQA.
    ("llama", dict(method="lora", seq_len=48, gradient_checkpointing=False, padding_free=True)),
    ("llama", dict(method="lora", seq_len=48, gradient_checkpointing=False, padding_free=True, attn="eager")),
    ("llama", dict(method="qlora", seq_len=48, gradient_checkpointing=True, padding_free=True)),
    ("qwen2", dict(method="qlora", seq_len=48, gradient_checkpointing=False, padding_free=True)),
    # Liger's RMSNorm and SwiGLU (CPU stand-ins that keep what the Triton kernels keep).
    ("llama", dict(method="lora", seq_len=64, gradient_checkpointing=False, liger=True)),
    ("llama", dict(method="qlora", seq_len=64, gradient_checkpointing=False, liger=True, padding_free=True)),
    ("llama", dict(method="full", seq_len=64, gradient_checkpointing=False, liger=True)),
]


@pytest.mark.parametrize("family, settings", ACTIVATION_CASES)
def test_activation_bytes_match_saved_tensors(family, settings, torch, tmp_path):
    from bench.memory_harness import build_model, make_batch, measure_saved_bytes

    arch = tiny_arch(family)
    s = MemorySettings(batch_size=2, device="cpu", **settings).normalized()
    targets = resolve_targets(arch, s.targets) if s.method != "full" else []
    predicted = activation_profile(arch, trace_plan(arch, s, targets)).hook_visible_total(s.gradient_checkpointing)
    # Reentrant checkpointing keeps each block's input through save_for_backward, where the hooks see it.
    model = build_model(arch, s, checkpoint_dir=tmp_path, reentrant=True)
    measured = measure_saved_bytes(model, make_batch(arch, s), s)["saved_bytes"]
    assert predicted == pytest.approx(measured, rel=0.02)


# ----------------------------------------------------------------------------- peak
PEAK_CASES = [
    dict(method="lora", gradient_checkpointing=True, loss="full_logits"),
    dict(method="qlora", gradient_checkpointing=False, loss="full_logits"),
    dict(method="full", gradient_checkpointing=True, loss="full_logits", optimizer="adamw_torch"),
    dict(method="qlora", gradient_checkpointing=True, loss="chunked"),
    dict(method="lora", gradient_checkpointing=False, loss="chunked", padding_free=True),
    dict(method="qlora", gradient_checkpointing=False, loss="chunked", liger=True),
]


@pytest.mark.parametrize("settings", PEAK_CASES)
def test_peak_matches_live_tensors_on_cpu(settings, torch, tmp_path):
    """The phase model (what is alive at the peak) against every tensor alive during real steps."""
    from bench.memory_harness import LiveBytesTracker, build_model, make_batch, make_optimizer, train_steps

    arch = tiny_arch(hidden_size=128, intermediate_size=352, num_hidden_layers=3, vocab_size=1024)
    s = MemorySettings(batch_size=2, seq_len=256, device="cpu", **settings)
    predicted = estimate(arch, s)
    model = build_model(arch, s, checkpoint_dir=tmp_path)
    optimizer = make_optimizer(model, s)
    batch = make_batch(arch, s)
    tracker = LiveBytesTracker()
    tracker.add_model(model)
    with tracker:
        train_steps(model, batch, s, optimizer, steps=2, tracker=tracker)
    assert predicted.peak_allocated_bytes == pytest.approx(tracker.peak, rel=0.05)


# ----------------------------------------------------------------------------- the estimate itself
def test_terms_add_up_to_peak_and_nvidia_smi():
    arch = load_arch("llama-3.1-8b")
    for method in ("full", "lora", "qlora", "lora8bit"):
        for optimizer in ("adamw_torch_fused", "paged_adamw_32bit", "adamw_8bit"):
            est = estimate(arch, MemorySettings(method=method, optimizer=optimizer))
            allocated = sum(est.terms[name] for name in MemoryEstimate.ALLOCATED_TERMS)
            assert allocated == est.peak_allocated_bytes
            assert est.nvidia_smi_bytes == (est.peak_allocated_bytes + est.terms["allocator_overhead"]
                                            + est.terms["cuda_context"] + est.terms["optimizer_states_paged"])
            assert set(est.explanations) >= {name for name, value in est.terms.items() if value}


def test_methods_order_and_paged_states_leave_the_allocator():
    arch = load_arch("llama-3.1-8b")
    smi = {m: estimate(arch, MemorySettings(method=m)).nvidia_smi_bytes for m in ("full", "lora", "qlora")}
    assert smi["qlora"] < smi["lora"] < smi["full"]
    fused = estimate(arch, MemorySettings(method="full", optimizer="adamw_torch_fused"))
    paged = estimate(arch, MemorySettings(method="full", optimizer="paged_adamw_32bit"))
    assert paged.terms["optimizer_states_paged"] > 0
    assert paged.terms["optimizer_states"] < fused.terms["optimizer_states"]


def test_full_logits_region_dominates_long_contexts_on_large_vocabularies():
    arch = load_arch("llama-3.2-1b")
    settings = MemorySettings(method="qlora", seq_len=8192, gradient_checkpointing=True)
    full = estimate(arch, MemorySettings(**{**settings.__dict__, "loss": "full_logits"}))
    chunked = estimate(arch, settings)
    logits = 8192 * arch.vocab_size
    assert full.peak_phase == "backward start (loss)"
    assert full.terms["logits_and_loss"] == 4 * logits  # the fp32 log-softmax kept for backward
    assert full.dominant_term() in ("logits_and_loss", "transient_buffers")
    assert chunked.peak_allocated_bytes < full.peak_allocated_bytes - 8 * logits


def test_boosters_move_the_terms_they_touch():
    arch = load_arch("llama-3.2-1b")
    base = dict(method="qlora", batch_size=4, seq_len=2048)
    est = {name: estimate(arch, MemorySettings(**base, **extra)) for name, extra in {
        "padded": dict(padded=True), "padding-free": dict(padding_free=True),
        "padded flash": dict(padded=True, attn="flash"), "padding-free flash": dict(padding_free=True, attn="flash"),
        "liger": dict(padded=True, liger=True)}.items()}
    # sdpa: the block-diagonal mask spans all 8192 tokens of the batch (batch x more than padded masks).
    assert est["padding-free"].terms["activations"] > est["padded"].terms["activations"]
    assert any("block-diagonal" in note for note in est["padding-free"].notes)
    # flash: no mask either way, and no gathering of unpadded tokens.
    assert est["padding-free flash"].terms["activations"] < est["padded flash"].terms["activations"]
    assert not est["padding-free flash"].notes
    # Liger keeps each norm's input instead of an fp32 copy, and two MLP tensors instead of three.
    assert est["liger"].activation_breakdown.get("MLP: gate (Liger)")
    assert est["liger"].peak_allocated_bytes < est["padded"].peak_allocated_bytes
    # Liger's fused linear cross-entropy removes the logits term a plain transformers loss keeps.
    full = estimate(arch, MemorySettings(**base, loss="full_logits"))
    fused = estimate(arch, MemorySettings(**base, loss="full_logits", liger=True))
    assert full.terms["logits_and_loss"] > 2 * 2**30 and fused.terms["logits_and_loss"] == 0
    assert fused.peak_allocated_bytes < full.peak_allocated_bytes - 2 * 2**30
    assert "Liger" in fused.explanations["logits_and_loss"]


def test_run_config_boosters_map_to_the_settings():
    from engine.config import RunConfig

    packed = RunConfig.from_dict({"model": {"name_or_path": "llama-3.2-1b", "attn_implementation": "flash_attention_2"},
                                  "train": {"packing": True, "use_liger_kernel": True,
                                            "per_device_train_batch_size": 4}})
    _, s = settings_from_run_config(packed)
    assert (s.padding_free, s.padded, s.liger, s.attn) == (True, False, True, "flash")
    wrapped = RunConfig.from_dict({"train": {"packing": True, "packing_strategy": "wrapped"}})
    assert not settings_from_run_config(wrapped)[1].padding_free
    free = RunConfig.from_dict({"train": {"padding_free": True, "per_device_train_batch_size": 4}})
    assert settings_from_run_config(free)[1].padding_free and not settings_from_run_config(free)[1].padded


def test_published_fits():
    """Claims the community relies on: QLoRA of an 8B model fits a 24 GB card, 16-bit LoRA of 70B does not fit 80 GB."""
    qlora_8b = estimate(load_arch("llama-3.1-8b"), MemorySettings(method="qlora", seq_len=2048))
    assert fits_on_gpus(qlora_8b)["RTX 4090 24 GB"]["fits"]
    lora_70b = estimate(load_arch("llama-3.1-70b"), MemorySettings(method="lora", seq_len=512))
    assert not fits_on_gpus(lora_70b)["H100 80 GB"]["fits"]
    qlora_70b = estimate(load_arch("llama-3.1-70b"), MemorySettings(method="qlora", seq_len=512))
    assert fits_on_gpus(qlora_70b)["A100 80 GB"]["fits"] and not fits_on_gpus(qlora_70b)["A100 40 GB"]["fits"]


def test_largest_batch_and_length_that_fit():
    arch = load_arch("llama-3.2-3b")
    settings = MemorySettings(method="qlora", seq_len=2048)
    best = max_batch_or_seq_that_fits(arch, settings, "RTX 4090 24 GB", "batch_size", limit=256)
    capacity = GPUS["RTX 4090 24 GB"]
    assert best >= 1
    assert estimate(arch, MemorySettings(method="qlora", seq_len=2048, batch_size=best)).nvidia_smi_bytes <= capacity
    assert estimate(arch, MemorySettings(method="qlora", seq_len=2048, batch_size=best + 1)).nvidia_smi_bytes > capacity
    longest = max_batch_or_seq_that_fits(arch, settings, "T4 16 GB", "seq_len")
    assert 2 < longest < 131072
    assert estimate(arch, MemorySettings(method="qlora", seq_len=longest + 1)).nvidia_smi_bytes > GPUS["T4 16 GB"]


# ----------------------------------------------------------------------------- inputs and errors
def test_unknown_architecture_names_what_is_missing():
    with pytest.raises(ArchitectureIncompleteError) as caught:
        arch_from_config({"model_type": "mystery", "hidden_size": 1024}, source="folder/config.json")
    message = str(caught.value)
    for words in ("number of layers", "attention heads", "intermediate", "vocabulary", "folder/config.json"):
        assert words in message
    typed = arch_from_numbers(1024, 8, 16, 4, 2816, 32000)
    assert estimate(typed, MemorySettings()).peak_allocated_bytes > 0


def test_unknown_model_and_target_are_sentences(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a catalog model"):
        load_arch("no-such-model")
    with pytest.raises(ConfigError, match="choose from"):
        resolve_targets(load_arch("phi-3-mini"), ["q_proj"])
    with pytest.raises(ConfigError):
        estimate(load_arch("llama-3.2-1b"), MemorySettings(method="adapter"))


def test_local_folder_config(tmp_path):
    config = dict(catalog_entry("qwen2.5-0.5b"))
    config.pop("_catalog")
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = load_arch(str(tmp_path))
    assert arch.total_params == load_arch("qwen2.5-0.5b").total_params
    assert arch.qkv_bias and not arch.o_bias


def test_run_config_mapping():
    run_config = {
        "model": {"name_or_path": "qwen2.5-1.5b", "attn_implementation": "sdpa"},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05,
                 "use_dora": False},
        "quant": {"load_in_4bit": True, "bnb_4bit_use_double_quant": False},
        "train": {"per_device_train_batch_size": 4, "max_length": 512, "gradient_checkpointing": True,
                  "optim": "paged_adamw_32bit", "bf16": True},
    }
    from engine.config import RunConfig

    run_config = RunConfig.from_dict(run_config)
    name, s = settings_from_run_config(run_config)
    assert name == "qwen2.5-1.5b"
    assert (s.method, s.rank, s.alpha, s.targets, s.double_quant, s.batch_size, s.seq_len) == (
        "qlora", 8, 16, ["q_proj", "v_proj"], False, 4, 512)
    assert s.padded and s.lora_dropout == 0.05
    est = estimate_for_run_config(run_config)
    assert est.settings["method"] == "qlora" and est.parameters["trainable"] > 0


def test_run_config_from_the_config_module():
    """The Train tab's RunConfig dictionaries map without translation."""
    from engine.config import RunConfig

    run_config = RunConfig()
    run_config.model.name_or_path = "smollm2-135m"
    est = estimate_for_run_config(run_config)
    assert est.model == "smollm2-135m"


# ----------------------------------------------------------------------------- command line and imports
def test_cli_json(capsys):
    code = cli_main(["--model", "llama-3.1-8b", "--method", "qlora", "--rank", "16", "--targets", "all-linear",
                     "--batch", "1", "--seq-len", "2048", "--optimizer", "paged_adamw_32bit", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["peak_allocated_bytes"] == sum(payload["terms"][name] for name in MemoryEstimate.ALLOCATED_TERMS)
    assert payload["nvidia_smi_bytes"] > payload["peak_allocated_bytes"]
    assert payload["terms"]["optimizer_states_paged"] > 0 and payload["fits"]["RTX 4090 24 GB"]


def test_cli_table_and_errors(capsys):
    assert cli_main(["--model", "gemma-2-2b", "--method", "lora", "--no-grad-ckpt", "--gpu", "L4"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "nvidia-smi" in out and "largest batch" in out
    assert "eager" in out  # Gemma 2's softcapping rules out SDPA, and the table says so
    assert cli_main(["--model", "nowhere/at-all-9b"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli_main(["--dims", "2048,16,32,8,8192,128256", "--method", "lora"]) == 0
    capsys.readouterr()
    assert cli_main(["--model", "llama-3.2-1b", "--batch", "4", "--packing", "--liger"]) == 0
    out = capsys.readouterr().out
    assert "(padding-free)" in out and "Liger kernels" in out and "block-diagonal" in out


def test_estimator_and_tab_do_not_import_torch():
    code = "import sys, engine.memory.estimator, ui.memory_tab; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_memory_tab_helpers(tmp_path):
    from ui import memory_tab

    form = {"source": "Catalog", "catalog_id": "llama-3.1-8b", "folder": "", "method": "qlora", "rank": 16,
            "alpha": 32, "targets": "all-linear", "dora": False, "lora_dropout": 0.0, "batch_size": 1,
            "seq_len": 2048, "gradient_checkpointing": True, "optimizer": "adamw_torch_fused",
            "compute_dtype": "bfloat16", "double_quant": True, "attn": "sdpa", "loss": "chunked",
            "kbit_upcast": True, "gpu": "RTX 4090 24 GB"}
    figure, rows, text = memory_tab.estimate_view(form)
    assert list(figure.data[0].x) == ["Full fine-tuning", "LoRA (16-bit base)", "QLoRA (4-bit NF4 base)"]
    assert len(figure.data) >= 5  # one stacked bar per term
    assert rows[-1][0] == "nvidia-smi" and "fits" in text
    custom = dict(form, source="Custom dimensions", hidden=4096, layers=0, heads=32, kv_heads=8,
                  intermediate=14336, vocab=128256, gpu=None)
    _, _, error = memory_tab.estimate_view(custom)
    assert error.startswith("**Cannot estimate:**")
    assert "Pick a run" in memory_tab.run_comparison_markdown(tmp_path, None)


def test_run_comparison_reads_a_run_directory(tmp_path):
    from engine.config import RunConfig
    from engine.training import rundir as runs
    from ui import memory_tab

    config = RunConfig()
    config.model.name_or_path = "smollm2-135m"
    run_dir = runs.create_run(tmp_path, config, name="measured")
    runs.append_jsonl(runs.RunPaths(run_dir).metrics, {"event": "log", "step": 1, "torch_peak_allocated_bytes": 2**30})
    runs.append_jsonl(runs.RunPaths(run_dir).gpu, {"t": 1.0, "source": "nvml", "process_bytes": 2 * 2**30,
                                                  "devices": [{"index": 0, "used_bytes": 3 * 2**30,
                                                               "total_bytes": 24 * 2**30}]})
    assert memory_tab.measured_peaks(run_dir) == {"torch": 2**30, "nvml": 2 * 2**30, "nvml_source": "nvml"}
    text = memory_tab.run_comparison_markdown(tmp_path, "measured")
    assert "| torch peak allocated |" in text and "1.00 GiB" in text and "2.00 GiB" in text


def test_bench_without_cuda_says_so_and_exits_zero():
    done = subprocess.run([sys.executable, "bench/memory_accuracy.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "No CUDA GPU" in done.stdout
