"""The one place a ``RunConfig`` becomes library objects, and what this machine can honour of it.

``decide_runtime`` settles device, precision, optimizer, 4-bit compute dtype and the speed
boosters (attention kernel, padding-free batches, Liger kernels), and says in words every
setting it could not honour (paged optimizers without CUDA, bf16 without a GPU that has it,
FlashAttention 2 or Liger without what they need...). ``to_lora_config``, ``to_bnb_config``,
``model_load_kwargs``, ``to_sft_config`` and ``to_data_collator`` then build PEFT's,
transformers' and TRL's objects from the config and that runtime. The worker, chat, export,
the memory harness and the benches all call these, so a field added to ``RunConfig`` reaches
every place that loads or trains a model at once (TRL's ``get_peft_config`` /
``get_quantization_config`` play the same role there).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import trackers
from engine.config.schema import RunConfig

# Optimizers implemented by bitsandbytes (paged, 8-bit and its 32-bit variants): CUDA only.
_BNB_OPTIMIZER_MARKS = ("paged_", "bnb", "_8bit", "_32bit")


@dataclass
class Runtime:
    """What this machine will actually do for a config; ``fallbacks`` are the sentences saying what changed."""

    device: str
    bf16: bool
    optim: str
    compute_dtype: str
    attn_implementation: str = "sdpa"
    padding_free: bool = False  # batches flattened into one sequence (asked for, or implied by bfd packing)
    use_liger_kernel: bool = False
    fallbacks: list[str] = field(default_factory=list)
    report_to: list[str] = field(default_factory=list)  # the chosen trackers that are installed
    wandb_offline: bool = False

    def as_dict(self) -> dict:
        return {"device": self.device, "bf16": self.bf16, "optim": self.optim, "compute_dtype": self.compute_dtype,
                "attn_implementation": self.attn_implementation, "padding_free": self.padding_free,
                "use_liger_kernel": self.use_liger_kernel}


# Packing strategies that keep each row's own positions: TRL makes their batches padding-free.
PADDING_FREE_PACKING = ("bfd", "bfd_split")


def is_padding_free(config: RunConfig) -> bool:
    """Padding-free batches: asked for, or implied by TRL's bfd packing (as ``SFTTrainer`` decides it)."""
    train = config.train
    return train.padding_free or (train.packing and train.packing_strategy in PADDING_FREE_PACKING)


def boosters(config: RunConfig) -> list[str]:
    """The speed boosters a config asks for, in words (the Train form's summary, the worker's log)."""
    train = config.train
    on = []
    if train.packing:
        on.append(f"packing ({train.packing_strategy})")
    if is_padding_free(config):
        on.append("padding-free" + ("" if train.padding_free else " (implied by packing)"))
    if train.use_liger_kernel:
        on.append("Liger kernels")
    if config.model.attn_implementation != "sdpa":
        on.append(config.model.attn_implementation)
    return on


def boosters_line(config: RunConfig) -> str:
    on = boosters(config)
    if not on:
        return f"Boosters: none (padded batches, {config.model.attn_implementation} attention)."
    attention = "" if config.model.attn_implementation != "sdpa" else " · sdpa attention"
    return "Boosters: " + " · ".join(on) + attention + "."


def _have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _is_bnb_optimizer(name: str) -> bool:
    return any(mark in name for mark in _BNB_OPTIMIZER_MARKS) and not name.startswith("adamw_torch")


def decide_runtime(config: RunConfig, device: str | None = None) -> Runtime:
    """Device, precision and optimizer for ``config`` on this machine (``device`` forces cpu/cuda)."""
    import torch

    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    train, quant = config.train, config.quant
    runtime = Runtime(device="cuda" if cuda else "cpu", bf16=train.bf16, optim=train.optim,
                      compute_dtype=quant.bnb_4bit_compute_dtype)
    say = runtime.fallbacks.append
    quantized = quant.load_in_4bit or quant.load_in_8bit
    if not cuda:
        say("No CUDA GPU found: training runs on the CPU.")
    if train.bf16 and not bf16_ok:
        runtime.bf16 = False
        say("bf16 mixed precision needs a GPU that supports it: training in float32 instead.")
    if _is_bnb_optimizer(train.optim) and not cuda:
        runtime.optim = "adamw_torch"
        what = "pages optimizer state through CUDA unified memory" if train.optim.startswith("paged_") else \
            "is a bitsandbytes CUDA optimizer"
        say(f"{train.optim} {what}: using adamw_torch instead.")
    if quantized and not cuda and quant.bnb_4bit_compute_dtype != "float32":
        runtime.compute_dtype = "float32"
        say(f"4-bit compute in {quant.bnb_4bit_compute_dtype} is slow on the CPU: computing in float32.")
    if quant.bnb_4bit_compute_dtype == "bfloat16" and cuda and not bf16_ok:
        runtime.compute_dtype = "float16"
        say("This GPU has no bf16: 4-bit compute in float16 instead.")
    if is_distributed(config):
        dist = config.distributed
        if not cuda:
            say(f"{dist.strategy} on the CPU: {dist.world_size} processes, each with a copy of the model, average "
                "their gradients over gloo; they share this machine's cores.")
        if dist.strategy == "fsdp" and quant.load_in_4bit and runtime.compute_dtype != quant.bnb_4bit_quant_storage:
            say(f"QLoRA with FSDP stores the 4-bit weights in the compute dtype: {runtime.compute_dtype} on this "
                "machine.")
    _decide_boosters(config, runtime, cuda, quantized)
    decide_trackers(config, runtime)
    return runtime


def _decide_boosters(config: RunConfig, runtime: Runtime, cuda: bool, quantized: bool) -> None:
    """Attention kernel, padding-free batches and Liger: what this machine can run, with a sentence otherwise.

    Padding-free batches need attention that reads per-row position ids. FlashAttention 2
    does it natively (varlen kernels fed by TRL's ``cu_seq_lens``); with sdpa and eager,
    transformers 5 finds the row boundaries in the position ids and builds a block-diagonal
    causal mask (``masking_utils.find_packed_sequence_indices``), so every attention choice
    here trains the same loss as padded batches (tests/test_boosters.py compares them).
    That mask covers the whole flattened batch (tokens x tokens), which the memory
    calculator counts; FlashAttention 2 has none.
    """
    import torch

    say = runtime.fallbacks.append
    model, train = config.model, config.train
    runtime.attn_implementation = model.attn_implementation
    runtime.padding_free = is_padding_free(config)
    runtime.use_liger_kernel = train.use_liger_kernel
    if model.attn_implementation == "flash_attention_2":
        half = (quantized and runtime.compute_dtype in ("bfloat16", "float16")) or runtime.bf16
        why = None
        if not cuda:
            why = "needs a CUDA GPU"
        elif not _have("flash_attn"):
            why = "needs the flash-attn package (pip install flash-attn)"
        elif torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
            why = "needs an Ampere or newer GPU (compute capability 8.0+)"
        elif not half:
            why = "runs only in bf16 or fp16, and this run trains in float32"
        if why:
            runtime.attn_implementation = "sdpa"
            say(f"FlashAttention 2 {why}: using sdpa attention instead"
                + (" (padding-free batches stay on, with a block-diagonal mask)." if runtime.padding_free else "."))
    if train.use_liger_kernel:
        missing = [name for name, package in (("triton", "triton"), ("liger-kernel", "liger_kernel"))
                   if not _have(package)]
        if not cuda or missing:
            runtime.use_liger_kernel = False
            why = "a CUDA GPU" if not cuda else " and ".join(missing) + " (pip install liger-kernel)"
            say(f"Liger kernels are Triton GPU kernels and need {why}: training without them.")


def decide_trackers(config: RunConfig, runtime: Runtime) -> None:
    """Which chosen trackers this machine has; W&B offline when it has no key or no network.

    A tracker is a copy of what the run directory holds, so a missing one is a sentence and the
    run goes on without it.
    """
    for name in config.train.report_to:
        if not trackers.installed(name):
            runtime.fallbacks.append(trackers.missing_sentence(name))
            continue
        runtime.report_to.append(name)
        if name == "wandb":
            reason = trackers.wandb_offline_reason()
            if reason:
                runtime.wandb_offline = True
                runtime.fallbacks.append(f"W&B logs offline (WANDB_MODE=offline) because {reason}: its copy stays "
                                         "in the run's wandb/ folder, and `wandb sync` uploads it later.")


def to_lora_config(config: RunConfig):
    """PEFT's ``LoraConfig`` for the run, or None for full fine-tuning."""
    if not config.lora.use_peft:
        return None
    from peft import LoraConfig

    lora = config.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def to_bnb_config(config: RunConfig, runtime: Runtime):
    """transformers' ``BitsAndBytesConfig`` for a quantized base, or None."""
    quant = config.quant
    if not (quant.load_in_4bit or quant.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=quant.load_in_4bit,
        load_in_8bit=quant.load_in_8bit,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, runtime.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_storage_for(config, runtime)),
    )


def quant_storage_for(config: RunConfig, runtime: Runtime) -> str:
    """The 4-bit storage dtype; under FSDP it follows the compute dtype this machine runs (see decide_runtime)."""
    if config.distributed.strategy == "fsdp" and config.quant.load_in_4bit:
        return runtime.compute_dtype
    return config.quant.bnb_4bit_quant_storage


def model_load_kwargs(config: RunConfig, runtime: Runtime, training: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for the run's base.

    ``training=False`` (chat, export references) loads an unquantized base in the dtype
    inference on this device wants rather than the training precision.
    """
    import torch

    kwargs: dict[str, Any] = {"revision": config.model.revision, "trust_remote_code": config.model.trust_remote_code,
                              "attn_implementation": runtime.attn_implementation}
    quantization = to_bnb_config(config, runtime)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["dtype"] = getattr(torch, runtime.compute_dtype)
        if runtime.device.startswith("cuda") and config.distributed.strategy != "fsdp":
            # Each process of a multi-GPU run loads onto its own GPU (accelerate's launcher sets LOCAL_RANK);
            # FSDP places the shards itself.
            local = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": local if runtime.device == "cuda" else runtime.device}
    elif training:
        kwargs["dtype"] = torch.bfloat16 if runtime.bf16 else torch.float32
    else:
        cuda = runtime.device.startswith("cuda")
        kwargs["dtype"] = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else \
            torch.float16 if cuda else torch.float32
    return kwargs


def to_sft_config(config: RunConfig, runtime: Runtime, output_dir: str | Path, has_eval: bool, resuming: bool = False):
    """TRL's ``SFTConfig``: the run's training fields plus what the runtime decided."""
    from trl import SFTConfig

    train = config.train
    checkpointing = {"use_reentrant": False} if train.gradient_checkpointing else None
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        lr_scheduler_kwargs=dict(train.lr_scheduler_kwargs or {}),
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=runtime.optim,
        max_length=train.max_length,
        packing=train.packing,
        packing_strategy=train.packing_strategy,
        # Held-out rows are never packed: a packed run's eval loss then averages the same rows in the
        # same batches as an unpacked run's (and as its own baseline), so the numbers compare.
        eval_packing=False,
        # Padding-free without packing goes through ``to_data_collator`` instead (see there).
        padding_free=runtime.padding_free and train.packing,
        # transformers' switch, applied by Trainer with Liger's fused loss off (TRL keeps its own chunked
        # loss). TRL 1.16 calls it deprecated in favour of Hub kernels (model_init_kwargs use_kernels), which
        # download kernel code from the Hub at run time; the installed liger-kernel package works offline.
        use_liger_kernel=runtime.use_liger_kernel,
        assistant_only_loss=train.assistant_only_loss,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpointing,
        bf16=runtime.bf16,
        use_cpu=runtime.device == "cpu",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        # The base model's held-out loss, measured by the same evaluation loop: the
        # baseline every run is judged against (the adapter starts as a no-op).
        eval_on_start=has_eval and not resuming,
        save_strategy="steps",
        save_steps=save_steps_for(config, has_eval),
        save_total_limit=train.save_total_limit,
        **early_stopping_arguments(config, has_eval),
        seed=train.seed,
        # transformers' own integrations; engine.training.trackers points each into the run directory.
        report_to=list(runtime.report_to) or "none",
        run_name=config.name,
        project="loralab",  # Trackio's project (the other trackers read theirs from the environment)
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataset_num_proc=None,
        # Every LoRA weight takes part in every step: DDP's search for unused parameters would be a wasted
        # pass over the graph (and transformers turns it on for a PeftModel when unset).
        ddp_find_unused_parameters=False if is_distributed(config) else None,
    )


def to_data_collator(config: RunConfig, runtime: Runtime, tokenizer):
    """TRL's padding-free collator when padding-free batches are asked for without packing, else None.

    TRL 1.16 refuses ``padding_free=True`` without packing while ``max_length`` is set (a guard
    from when truncation happened in the collator; its dataset preparation now truncates to
    ``max_length`` whatever the collator). Handing in TRL's own ``DataCollatorForLanguageModeling``
    with ``padding_free=True`` keeps both: rows truncated at ``max_length``, batches flattened
    with per-row position ids. With packing, ``SFTTrainer`` builds the same collator itself.
    """
    if not runtime.padding_free or config.train.packing:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def early_stopping_on(config: RunConfig, has_eval: bool) -> bool:
    """Early stopping needs evaluations: on when a patience is set and the run has held-out rows."""
    return bool(config.train.early_stopping_patience) and has_eval


def save_steps_for(config: RunConfig, has_eval: bool) -> int:
    """``save_steps``, aligned with ``eval_steps`` under early stopping.

    transformers' ``load_best_model_at_end`` can only go back to an evaluation that has a
    checkpoint, so it refuses a save interval that is not a multiple of the eval interval;
    saving at every evaluation is the smallest change that satisfies it.
    """
    train = config.train
    if early_stopping_on(config, has_eval) and train.save_steps % train.eval_steps != 0:
        return train.eval_steps
    return train.save_steps


def best_metric_key(config: RunConfig) -> str:
    """The metric as transformers' ``metric_for_best_model`` names it (it reads ``eval_`` + this name; the task
    score arrives as ``eval_task_score``, added to the evaluation's metrics by engine.training.task_eval)."""
    return config.train.early_stopping_metric


def early_stopping_arguments(config: RunConfig, has_eval: bool) -> dict[str, Any]:
    """The SFTConfig arguments of early stopping: keep the best checkpoint and load it at the end."""
    if not early_stopping_on(config, has_eval):
        return {}
    return {"load_best_model_at_end": True, "metric_for_best_model": best_metric_key(config),
            "greater_is_better": config.early_stopping_greater_is_better}


def early_stopping_callback(config: RunConfig, has_eval: bool):
    """transformers' ``EarlyStoppingCallback`` for the run, or None when early stopping is off."""
    if not early_stopping_on(config, has_eval):
        return None
    from transformers import EarlyStoppingCallback

    return EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience)


# ----------------------------------------------------------------------------- multi-GPU: accelerate config, launch
ACCELERATE_DIR = "accelerate"  # inside the run directory: config.yaml and one launch command per machine
ACCELERATE_CONFIG = "config.yaml"
# distributed.gpu_ids are NVML's indices (what the form lists); CUDA numbers GPUs fastest-first unless told
# to follow the PCI bus as NVML does.
GPU_ORDER_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def is_distributed(config: RunConfig) -> bool:
    return config.distributed.strategy != "none"


def to_accelerate_config(config: RunConfig) -> dict[str, Any]:
    """accelerate's config file (what ``accelerate config`` would write) for the run's ``distributed`` section.

    ``mixed_precision`` stays "no" here: transformers' ``TrainingArguments`` sets accelerate's
    precision from the run's own bf16 decision (``decide_runtime``), so the two never disagree.
    Without GPUs the DDP launch is still accelerate's multi-GPU launcher (torchrun): each
    process then trains on the CPU (``use_cpu``, set by ``to_sft_config``) and accelerate picks
    the gloo backend; accelerate's own ``--cpu`` launcher starts one process unless MPI is there.
    """
    dist = config.distributed
    data: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if dist.strategy == "fsdp" else "MULTI_GPU",
        "num_machines": dist.num_machines,
        "num_processes": dist.world_size,  # accelerate counts processes over all machines
        "machine_rank": 0,
        "gpu_ids": str(dist.gpu_ids or "all").replace(" ", ""),
        "main_process_ip": dist.main_process_ip,
        "main_process_port": dist.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "no",
        "use_cpu": False,
        "downcast_bf16": "no",
        "debug": False,
        "main_training_function": "main",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if dist.num_machines == 1:
        data.pop("main_process_ip")
    if dist.strategy == "fsdp":
        data["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": dist.fsdp_sharding_strategy,
            "fsdp_auto_wrap_policy": dist.fsdp_auto_wrap_policy,
            "fsdp_offload_params": dist.fsdp_offload_params,
            "fsdp_cpu_ram_efficient_loading": dist.fsdp_cpu_ram_efficient_loading,
            # sync_module_states broadcasts rank 0's weights, which RAM-efficient loading requires.
            "fsdp_sync_module_states": True,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            # PEFT's FSDP recipe: frozen and trainable weights in one flat parameter need use_orig_params off
            # (transformers' Trainer wraps with PEFT's auto-wrap policy when the model is a PeftModel).
            "fsdp_use_orig_params": False,
            # Checkpoints sharded per rank (fast to save and resumable); the adapter is gathered when saved.
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": False,
        }
    return data


def accelerate_config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ACCELERATE_DIR / ACCELERATE_CONFIG


def launch_arguments(config: RunConfig, run_dir: str | Path, machine_rank: int = 0, resume: bool = False) -> list[str]:
    """The arguments after ``accelerate launch`` that start the worker on machine ``machine_rank``.

    The dashboard's launcher (``engine.training.launch``) passes exactly these to accelerate's
    launcher on machine 0; ``launch_commands`` prints the same for every machine.
    """
    dist = config.distributed
    run_dir = Path(run_dir).resolve()  # the commands start in the project folder, wherever the runs folder is
    args = ["--config_file", str(accelerate_config_path(run_dir))]
    if dist.num_machines > 1:
        args += ["--num_machines", str(dist.num_machines), "--machine_rank", str(machine_rank),
                 "--main_process_ip", str(dist.main_process_ip), "--main_process_port", str(dist.main_process_port)]
    args += ["--module", "engine.training.worker", str(run_dir)]
    return args + (["--resume"] if resume else [])


def launch_commands(config: RunConfig, run_dir: str | Path, project_root: str | Path,
                    resume: bool = False) -> list[str]:
    """One shell command per machine, machine 0 first: what "Show command" shows and ``accelerate/`` holds.

    Every machine needs this project, the base model and the data at the same paths, and the
    run directory on a shared filesystem (the non-zero ranks read its config; rank 0 writes).
    """
    import shlex

    return [f"cd {shlex.quote(str(project_root))} && accelerate launch "
            + shlex.join(launch_arguments(config, run_dir, rank, resume))
            for rank in range(config.distributed.num_machines)]


def write_accelerate_files(config: RunConfig, run_dir: str | Path, project_root: str | Path) -> list[Path]:
    """Write ``accelerate/config.yaml`` and ``accelerate/launch_machine_<rank>.sh`` into the run; returns them."""
    import shlex

    import yaml

    folder = Path(run_dir) / ACCELERATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = accelerate_config_path(run_dir)
    path.write_text(yaml.safe_dump(to_accelerate_config(config), sort_keys=False), encoding="utf-8")
    written = [path]
    total = config.distributed.num_machines
    for rank, command in enumerate(launch_commands(config, run_dir, project_root)):
        script = folder / f"launch_machine_{rank}.sh"
        who = "the dashboard runs this one itself" if rank == 0 else "run this on that machine"
        order = "".join(f"export {key}={value}\n" for key, value in GPU_ORDER_ENV.items())
        script.write_text(f"#!/bin/sh\n# Machine {rank} of {total} ({who}); add --resume to continue from the "
                          f"last checkpoint.\nexport PYTHONPATH={shlex.quote(str(project_root))}\n{order}{command}\n",
                          encoding="utf-8")
        script.chmod(0o755)
        written.append(script)
    return written
