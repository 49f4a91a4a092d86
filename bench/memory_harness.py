"""Real models for checking the memory estimator: build them the way training does, then measure.

The estimator in ``engine/memory/estimator.py`` is arithmetic; this module is its counterpart made
of torch objects, used by ``tests/test_memory.py`` (tiny models on the CPU) and by
``bench/memory_accuracy.py`` (catalog-sized models with random weights on CUDA). It
builds a model from a :class:`~engine.memory.arch.ModelArch` and
:class:`~engine.memory.estimator.MemorySettings` along the same path as LoRA Lab's worker (load in
the compute dtype or through bitsandbytes, optionally ``prepare_model_for_kbit_training``,
gradient checkpointing, TRL's fused LM head, PEFT, TRL's bf16 cast of adapters on a
quantized base) and measures parameters, quantized storage and saved activations.

torch, transformers, peft and bitsandbytes are imported inside the functions.
"""

from __future__ import annotations

import functools
import tempfile
import weakref
from pathlib import Path

from engine.memory.arch import ModelArch
from engine.memory.estimator import MemorySettings, precision_of
from engine.memory.live import LiveBytesTracker
from engine.memory.random_model import hf_config, save_random_model

TORCH_DTYPES = {2: "bfloat16", 4: "float32"}


def _torch_dtype(settings: MemorySettings):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[settings.compute_dtype]


def run_config_for(s: MemorySettings):
    """The RunConfig a LoRA Lab run with these memory settings would have: the harness builds its
    LoraConfig and BitsAndBytesConfig through engine.config.build, exactly as training does."""
    from engine.config import RunConfig

    config = RunConfig()
    config.set_method({"qlora": "qlora", "lora8bit": "lora8bit", "full": "full"}.get(s.method, "lora"))
    config.lora.r, config.lora.lora_alpha, config.lora.lora_dropout = s.rank, float(s.alpha), s.lora_dropout
    config.lora.target_modules = s.targets if isinstance(s.targets, str) else list(s.targets)
    config.lora.use_dora = s.dora
    config.quant.bnb_4bit_use_double_quant = s.double_quant
    config.quant.bnb_4bit_compute_dtype = s.compute_dtype
    return config


def _runtime(s: MemorySettings, device: str):
    from engine.config.build import Runtime

    return Runtime(device=device, bf16=s.compute_dtype == "bfloat16", optim=s.optimizer, compute_dtype=s.compute_dtype)


def build_model(arch: ModelArch, settings: MemorySettings, device: str = "cpu", checkpoint_dir: Path | None = None,
                reentrant: bool = False, seed: int = 0):
    """The model a LoRA Lab training run would train, with random weights.

    Quantized bases are loaded through ``from_pretrained(..., quantization_config=...)``
    from a random checkpoint (written to ``checkpoint_dir`` or a temporary folder), so the
    quantization is exactly the one training uses.
    """
    import torch
    from transformers import AutoModelForCausalLM

    s = settings.normalized()
    dtype = _torch_dtype(s)
    torch.manual_seed(seed)
    if s.method in ("qlora", "lora8bit"):
        folder = Path(checkpoint_dir or tempfile.mkdtemp(prefix="loralab-mem-"))
        save_random_model(arch, folder, "bfloat16" if dtype != torch.float32 else "float32", device=device, seed=seed)
        from engine.config.build import to_bnb_config

        quant = to_bnb_config(run_config_for(s), _runtime(s, device))
        device_map = {"": device if device == "cpu" else torch.device(device).index or 0}
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=dtype, device_map=device_map,
            attn_implementation=hf_config(arch, s.attn)._attn_implementation,
        )
    else:
        weights_dtype = getattr(torch, TORCH_DTYPES[precision_of(s).weights])
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(arch, s.attn), dtype=weights_dtype)
    model.config.use_cache = False
    return prepare_for_training(model, s, reentrant=reentrant)


def prepare_for_training(model, s: MemorySettings, reentrant: bool = False):
    """Apply what the training path applies: kbit preparation, checkpointing, fused loss, PEFT."""
    import torch

    kwargs = {"use_reentrant": reentrant}
    if s.method in ("qlora", "lora8bit") and s.kbit_upcast:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=s.gradient_checkpointing, gradient_checkpointing_kwargs=kwargs
        )
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if s.loss == "chunked":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if s.liger:
        apply_liger(model)
    if s.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        model.train()
        return model
    from peft import get_peft_model

    from engine.config.build import to_lora_config

    model = get_peft_model(model, to_lora_config(run_config_for(s)))
    if s.gradient_checkpointing:
        model.enable_input_require_grads()  # what TRL's SFTTrainer does for PEFT + checkpointing
    if s.method in ("qlora", "lora8bit") and s.adapter_dtype == "auto":
        for name, param in model.named_parameters():  # TRL: adapters of a quantized base in bf16
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    model.train()
    return model


def make_batch(arch: ModelArch, settings: MemorySettings, device: str = "cpu", seed: int = 0) -> dict:
    """Random token ids of the requested shape; with ``padded`` the last row ends in one pad token.

    With ``padding_free`` the rows go through TRL's padding-free collator, as training does:
    one row of all tokens, per-row position ids and the varlen boundaries (``cu_seq_lens_*``).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch.vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
    if settings.padding_free:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            [{"input_ids": row} for row in ids.tolist()])
        return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
    batch = {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
    if settings.padded:
        mask = torch.ones_like(ids)
        mask[-1, -1] = 0
        batch["attention_mask"] = mask.to(device)
        batch["labels"][-1, -1] = -100
    return batch


def forward_loss(model, batch: dict, settings: MemorySettings):
    """One forward pass returning the loss, as the trainer computes it."""
    if settings.loss == "chunked":
        return model(**batch, fused_lm_head=True, use_cache=False).loss
    return model(**batch, use_cache=False).loss


def _excluded_storages(model) -> set[int]:
    pointers = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        pointers.add(tensor.untyped_storage().data_ptr())
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=False).values():
                if hasattr(value, "untyped_storage"):
                    pointers.add(value.untyped_storage().data_ptr())
    return pointers


def measure_saved_bytes(model, batch: dict, settings: MemorySettings, device_type: str = "cpu") -> dict:
    """Bytes autograd keeps for backward after one forward pass, deduplicated by storage.

    ``saved_tensors_hooks`` sees every tensor an op saves; parameters (and views of them)
    are excluded, and only tensors still alive when the forward ends are counted, so a
    branch whose graph was dropped (a detached computation) does not count.
    """
    import torch

    excluded = _excluded_storages(model)
    alive: list = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in excluded:
            alive.append(weakref.ref(tensor))
        return tensor

    dtype = _torch_dtype(settings)
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = forward_loss(model, batch, settings)
    storages: dict[int, int] = {}
    for ref in alive:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    loss.backward()  # also proves the graph is complete
    return {"saved_bytes": total, "tensors": len(storages)}


def meta_parameter_counts(arch: ModelArch, settings: MemorySettings) -> tuple[int, int]:
    """(trainable, total) parameters of a meta-device model wrapped as training wraps it."""
    import torch
    from transformers import AutoModelForCausalLM

    s = settings.normalized()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch))
    if s.method == "full":
        total = sum(p.numel() for p in model.parameters())
        return total, total
    from peft import get_peft_model

    from engine.config.build import to_lora_config

    peft_model = get_peft_model(model, to_lora_config(run_config_for(s)))
    return peft_model.get_nb_trainable_parameters()


def quantized_storage_bytes(model) -> dict[str, int]:
    """Bytes of bitsandbytes weights and of their quantization constants, read from the tensors."""
    packed = constants = 0
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)  # PEFT wrappers expose their base layer's weight too
        if weight is None or weight.untyped_storage().data_ptr() in seen:
            continue
        seen.add(weight.untyped_storage().data_ptr())
        kind = type(weight).__name__
        if kind == "Params4bit":
            packed += weight.untyped_storage().nbytes()
            state = weight.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            constants += sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
        elif kind == "Int8Params":
            packed += weight.untyped_storage().nbytes()
            scb = getattr(weight, "SCB", None)
            if scb is not None:
                constants += scb.untyped_storage().nbytes()
    return {"packed": packed, "constants": constants}


def make_optimizer(model, settings: MemorySettings):
    """The optimizer transformers' Trainer would create for ``settings.optimizer``."""
    from transformers import Trainer

    from engine.config.build import Runtime, to_sft_config

    s = settings.normalized()
    name = {"adamw_8bit": "adamw_bnb_8bit"}.get(s.optimizer, s.optimizer)
    runtime = Runtime(device="cpu" if next(model.parameters()).device.type == "cpu" else "cuda", bf16=False,
                      optim=name, compute_dtype=s.compute_dtype)
    args = to_sft_config(run_config_for(s), runtime, tempfile.mkdtemp(prefix="loralab-opt-"), has_eval=False)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = cls(params, **kwargs)
    if "8bit" in s.optimizer:
        import bitsandbytes as bnb
        import torch

        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def train_steps(model, batch: dict, settings: MemorySettings, optimizer, steps: int = 2, device_type: str = "cpu",
                tracker: LiveBytesTracker | None = None) -> list[float]:
    """A few optimizer steps the way transformers' Trainer runs them (autocast, clip, step, zero_grad)."""
    import torch

    dtype = _torch_dtype(settings)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(steps):
        if tracker:
            tracker.phase = "forward"
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward_loss(model, batch, settings)
        if tracker:
            tracker.phase = "backward"
        loss.backward()
        if tracker:
            tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------- Liger
def apply_liger(model) -> str:
    """Liger's kernels as training applies them, or CPU stand-ins; returns which ("liger" or "stand-ins").

    On CUDA with liger-kernel installed this is transformers' ``apply_liger_kernel`` with the
    fused linear cross-entropy off, as TRL's ``SFTTrainer`` calls it (TRL keeps its own chunked loss).
    """
    import importlib.util

    on_cuda = next(model.parameters()).device.type == "cuda"
    if on_cuda and importlib.util.find_spec("liger_kernel") and importlib.util.find_spec("triton"):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, {"fused_linear_cross_entropy": False})
        return "liger"
    apply_liger_stand_ins(model)
    return "stand-ins"


def apply_liger_stand_ins(model) -> None:
    """Liger's RMSNorm and SwiGLU as plain-torch autograd functions that keep what Liger keeps.

    Liger's kernels are Triton and need a GPU. These stand-ins compute the same values in torch
    and call ``ctx.save_for_backward`` with the same tensors as ``liger_kernel.ops.rms_norm``
    (``X, W, RSTD``) and ``liger_kernel.ops.swiglu`` (``a, b``), patched onto the modules the
    way ``_apply_liger_kernel_to_instance`` patches them, so the CPU proofs can check the
    estimator's Liger bookkeeping; bench/gpu_check.sh measures the real kernels.
    """
    import types

    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "weight"):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif kind.endswith("MLP") and hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            module.forward = types.MethodType(_swiglu_forward, module)


def _rms_norm_forward(self, hidden_states):
    return _LigerRMSNormStandIn.apply(hidden_states, self.weight, getattr(self, "variance_epsilon", 1e-6))


def _swiglu_forward(self, x):
    return self.down_proj(_LigerSiLUMulStandIn.apply(self.gate_proj(x), self.up_proj(x)))


@functools.cache
def _stand_in_classes():
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)  # fp32, one per row
            y = ((x32 * rstd.unsqueeze(-1)) * weight.float()).to(x.dtype)
            ctx.save_for_backward(x, weight, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, weight, rstd = ctx.saved_tensors
            x_hat = x.float() * rstd.unsqueeze(-1)
            g = dy.float() * weight.float()
            dx = rstd.unsqueeze(-1) * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
            dw = ((dy.float() * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
                  if ctx.needs_input_grad[1] else None)
            return dx.to(x.dtype), dw, None

    class SiLUMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            a32, sig = a.float(), torch.sigmoid(a.float())
            da = dc.float() * b.float() * sig * (1 + a32 * (1 - sig))
            db = dc.float() * a32 * sig
            return da.to(a.dtype), db.to(b.dtype)

    return RMSNorm, SiLUMul


class _Lazy:
    """Builds the torch classes on first use, so importing this module stays torch-free."""

    def __init__(self, index: int):
        self.index = index

    def apply(self, *args):
        return _stand_in_classes()[self.index].apply(*args)


_LigerRMSNormStandIn, _LigerSiLUMulStandIn = _Lazy(0), _Lazy(1)
