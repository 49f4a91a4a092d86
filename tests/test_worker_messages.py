"""Failure explanations: what a person reads in status.json when a run dies."""

import torch

from engine.config.build import decide_runtime
from engine.errors import ConfigError
from engine.training.worker import explain_failure, record_runtime


def test_cuda_oom_is_explained_with_what_to_change():
    message = explain_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    for advice in ("ran out of memory", "QLoRA", "batch size", "max_length", "gradient checkpointing", "Memory tab"):
        assert advice in message
    assert "Tried to allocate 2.00 GiB" in message


def test_project_errors_pass_through_and_others_name_their_type():
    assert explain_failure(ConfigError("lora.r", "rank must be a positive integer, got 0.")) == \
        "lora.r: rank must be a positive integer, got 0."
    message = explain_failure(ValueError("shapes do not match\nlong internal detail"))
    assert message.startswith("Training failed with ValueError: shapes do not match")
    assert "long internal detail" not in message and "train.log" in message


def test_cpu_fallbacks_are_recorded_in_words(tmp_path):
    from engine.config import load_preset
    from engine.training import rundir

    config = load_preset("qlora")
    run_dir = rundir.create_run(tmp_path, config)
    runtime = decide_runtime(config)
    assert runtime.as_dict() == {"device": "cpu", "bf16": False, "optim": "adamw_torch", "compute_dtype": "float32",
                                 "attn_implementation": "sdpa", "padding_free": False, "use_liger_kernel": False}
    record_runtime(run_dir, runtime)
    fallbacks = rundir.read_status(run_dir)["fallbacks"]
    assert any("paged_adamw_32bit" in f and "adamw_torch" in f for f in fallbacks)
    assert any("bf16" in f for f in fallbacks) and any("No CUDA" in f for f in fallbacks)
