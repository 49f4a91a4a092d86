"""Training memory, predicted term by term before a run: "will this fit, and why?".

``estimate(arch, settings)`` returns every byte a fine-tuning step keeps on the GPU,
split into terms a person can act on (quantized weights, 16/32-bit weights, adapters,
gradients, optimizer states, activations, the logits and loss region, transient buffers,
library workspaces, allocator overhead, CUDA context), the peak that
``torch.cuda.max_memory_allocated`` will report, and what ``nvidia-smi`` will show.

It models the LoRA Lab training path (TRL ``SFTTrainer`` + PEFT + bitsandbytes under
``torch.autocast``), and every assumption is a field of :class:`MemorySettings` so it can
be switched: e.g. ``loss="full_logits"`` for a plain transformers loss that upcasts the
whole ``batch x length x vocab`` logits to fp32, or ``kbit_upcast=False`` when
``prepare_model_for_kbit_training`` is not called. docs/memory.md derives each term.

Pure arithmetic over the model's config: no torch import, no GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from engine.errors import ConfigError
from engine.memory.activations import ActivationProfile, TracePlan, activation_profile
from engine.memory.arch import (
    ModelArch,
    lm_head_targeted,
    load_arch,
    lora_param_tensors,
    resolve_targets,
)

GiB = 1024**3
MiB = 1024**2

METHODS = {
    "full": "full",
    "lora": "lora",
    "lora16": "lora",
    "lora-16bit": "lora",
    "qlora": "qlora",
    "qlora-4bit": "qlora",
    "nf4": "qlora",
    "lora8bit": "lora8bit",
    "lora-8bit": "lora8bit",
    "8bit": "lora8bit",
}
METHOD_LABELS = {
    "full": "Full fine-tuning",
    "lora": "LoRA (16-bit base)",
    "qlora": "QLoRA (4-bit NF4 base)",
    "lora8bit": "LoRA on an 8-bit base",
}
OPTIMIZERS = {
    "adamw": "adamw_torch_fused",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_torch": "adamw_torch",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "8bit_adamw": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
}
DTYPES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
ATTENTION = ("sdpa", "flash", "eager")

# NVML total memory of common cards (what nvidia-smi prints as the card's size).
GPUS = {
    "T4 16 GB": 15360 * MiB,
    "L4 24 GB": 23034 * MiB,
    "RTX 3090 24 GB": 24576 * MiB,
    "RTX 4090 24 GB": 24564 * MiB,
    "A100 40 GB": 40960 * MiB,
    "A100 80 GB": 81920 * MiB,
    "H100 80 GB": 81559 * MiB,
}
NO_BF16 = {"T4 16 GB"}  # Turing: no bfloat16 kernels

# Constants of the CUDA side that no config can give; docs/memory.md says where they come from.
CUDA_CONTEXT_BYTES = 600 * MiB  # driver + PyTorch kernels + cuBLAS handles, as nvidia-smi counts them
CUBLAS_WORKSPACE_BYTES = 64 * MiB  # cuBLAS/cuBLASLt workspaces (forward and backward threads) in the allocator
ALLOCATOR_BLOCK = 512  # the caching allocator rounds every allocation up to 512 bytes
TRL_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
NF4_BLOCK = 64  # bitsandbytes Params4bit blocksize (absmax per 64 weights)
DQ_BLOCK = 256  # double quantization: one fp32 scale per 256 absmax values
PAGED_MIN_NUMEL = 100_000  # bnb get_state_buffer: smaller tensors stay in the normal allocator
BNB_8BIT_MIN_NUMEL = 4096  # bnb min_8bit_size: smaller tensors keep 32-bit states
BNB_8BIT_BLOCK = 256  # blockwise 8-bit optimizer states: one fp32 absmax per 256 values


@dataclass
class MemorySettings:
    """A training setup, as far as memory is concerned. Defaults follow LoRA Lab's worker."""

    method: str = "qlora"  # full | lora | qlora | lora8bit
    rank: int = 16
    alpha: int = 32
    targets: str | list = "all-linear"
    dora: bool = False
    lora_dropout: float = 0.0
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_torch_fused"  # transformers' default optim on torch >= 2.8
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    attn: str = "sdpa"  # sdpa | flash | eager
    loss: str = "chunked"  # chunked: TRL's fused LM head; full_logits: transformers' loss over all logits
    kbit_upcast: bool = True  # prepare_model_for_kbit_training casts every non-quantized weight to fp32
    adapter_dtype: str = "auto"  # auto: fp32 on a 16-bit base (PEFT), bf16 on a quantized base (TRL)
    padded: bool = False  # batches carry padding, so attention gets a mask
    # Padding-free batches (TRL padding_free, or bfd packing): the batch's rows are flattened into one
    # sequence of batch_size x seq_len tokens at most, with per-row position ids. flash attention
    # runs it without a mask; sdpa and eager get a block-diagonal mask over the whole sequence.
    padding_free: bool = False
    liger: bool = False  # Liger kernels (RMSNorm, SwiGLU; with full_logits its fused linear cross-entropy)
    grad_accum: int = 1  # gradient accumulation steps (>1 keeps gradients alive across micro-batches)
    device: str = "cuda"  # cuda | cpu (only used by the CPU proofs)
    # Several GPUs (distributed.*): the estimate is per GPU. ddp replicates everything; fsdp divides the
    # weights, gradients and optimizer states over ``shards`` GPUs and gathers one block at a time.
    strategy: str = "none"  # none | ddp | fsdp
    processes: int = 1  # processes in all, one per GPU
    fsdp_sharding: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    shards: int = 0  # GPUs a shard group spans (HYBRID_SHARD: one machine's); 0 means all processes
    fsdp_offload: bool = False  # parameters and optimizer states kept in CPU memory between uses

    def normalized(self) -> MemorySettings:
        """A copy with names canonicalised and ranges checked (raises ConfigError)."""
        method = METHODS.get(str(self.method).lower())
        if method is None:
            raise ConfigError("method", f"'{self.method}' is not one of full, lora, qlora, lora8bit.")
        optimizer = OPTIMIZERS.get(str(self.optimizer).lower())
        if optimizer is None:
            raise ConfigError(
                "optimizer", f"'{self.optimizer}' is not supported; use one of {', '.join(sorted(set(OPTIMIZERS)))}."
            )
        compute = str(self.compute_dtype).lower()
        if compute not in DTYPES:
            raise ConfigError("compute_dtype", f"'{self.compute_dtype}' is not bfloat16, float16 or float32.")
        compute = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(compute, compute)
        if self.attn not in ATTENTION:
            raise ConfigError("attn", f"'{self.attn}' is not one of {', '.join(ATTENTION)}.")
        if self.loss not in ("chunked", "full_logits"):
            raise ConfigError("loss", f"'{self.loss}' is not 'chunked' or 'full_logits'.")
        for name, low in (("batch_size", 1), ("seq_len", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(name, f"must be a whole number of at least {low}, got {value!r}.")
        if method != "full" and (not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError("rank", f"must be a whole number of at least 1, got {self.rank!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}.")
        if self.strategy not in ("none", "ddp", "fsdp"):
            raise ConfigError("strategy", f"'{self.strategy}' is not none, ddp or fsdp.")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ConfigError("processes", f"must be a whole number of at least 1, got {self.processes!r}.")
        return replace(self, method=method, optimizer=optimizer, compute_dtype=compute)

    def as_model_sees_it(self) -> MemorySettings:
        """The batch's shape as the forward pass gets it: padding-free batches are one row of all tokens.

        A padded batch of b rows is b x seq_len tokens when its longest row is seq_len long; a
        padding-free batch holds at most the same tokens as one row, and a mask exists only where
        the attention kernel needs one (sdpa, eager: block-diagonal; flash: none, varlen kernels).
        """
        if not self.padding_free:
            return self
        return replace(self, batch_size=1, seq_len=self.batch_size * self.seq_len, padded=self.attn != "flash",
                       padding_free=False)


@dataclass
class MemoryEstimate:
    """The prediction: bytes per term at the peak, with a sentence for each."""

    model: str
    settings: dict
    terms: dict[str, int]
    explanations: dict[str, str]
    peak_allocated_bytes: int
    reserved_bytes: int
    nvidia_smi_bytes: int
    peak_phase: str
    phases: dict[str, int]
    parameters: dict[str, int]
    activation_breakdown: dict[str, int]
    notes: list[str] = field(default_factory=list)

    ALLOCATED_TERMS = (
        "quantized_weights",
        "quantization_constants",
        "weights_16_32bit",
        "adapter_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits_and_loss",
        "transient_buffers",
        "library_workspaces",
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def dominant_term(self) -> str:
        return max(self.terms, key=lambda name: self.terms[name])

    def advice(self) -> str:
        """Which term dominates and what would shrink it, in one or two sentences."""
        name = self.dominant_term()
        share = self.terms[name] / max(self.nvidia_smi_bytes, 1)
        method = self.settings.get("method")
        hints = {
            "quantized_weights": "a smaller base model is the only lever left; the weights are already 4/8-bit.",
            "weights_16_32bit": (
                "QLoRA (4-bit NF4) stores the block weights in about a quarter of the space."
                if method in ("lora", "full")
                else "the embeddings and LM head stay unquantized; without prepare_model_for_kbit_training "
                "(kbit_upcast off) they stay 16-bit instead of fp32."
            ),
            "optimizer_states": (
                "LoRA trains a fraction of a percent of the weights; for full fine-tuning, 8-bit AdamW quarters "
                "the states and paged AdamW moves them out of PyTorch's allocator."
                if method == "full"
                else "a lower rank or fewer target modules shrinks them; 8-bit AdamW quarters them."
            ),
            "gradients": "LoRA or QLoRA only keep gradients for the adapters.",
            "activations": (
                "gradient checkpointing keeps one tensor per layer instead of all of them."
                if not self.settings.get("gradient_checkpointing")
                else "a shorter sequence or a smaller batch shrinks them linearly (use gradient accumulation)."
            ),
            "logits_and_loss": (
                "the chunked (fused) loss of TRL, or Liger's fused linear cross-entropy, never builds the full fp32 "
                "logits; shorter sequences or a smaller batch shrink this term linearly."
            ),
            "transient_buffers": "a shorter sequence or a smaller batch shrinks the backward pass buffers.",
            "optimizer_states_paged": "paged states live outside PyTorch's allocator and may spill to CPU RAM.",
        }
        title = TERM_TITLES.get(name, name)
        verb = "dominate" if title.endswith("s") else "dominates"
        return f"{title} {verb} ({share:.0%} of what nvidia-smi will show): {hints.get(name, '')}"


TERM_TITLES = {
    "quantized_weights": "Quantized weights",
    "quantization_constants": "Quantization constants",
    "weights_16_32bit": "16/32-bit weights",
    "adapter_weights": "Adapter weights",
    "gradients": "Gradients",
    "optimizer_states": "Optimizer states",
    "optimizer_states_paged": "Paged optimizer states",
    "activations": "Activations",
    "logits_and_loss": "Logits and loss",
    "transient_buffers": "Transient buffers",
    "library_workspaces": "Library workspaces",
    "allocator_overhead": "Allocator overhead",
    "cuda_context": "CUDA context",
}


# ------------------------------------------------------------------------ helpers
def _round_block(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for a request of ``nbytes``."""
    return -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK if nbytes else 0


def _dtype_bytes(name: str) -> int:
    return DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """Which dtype each kind of tensor has, derived from the method and compute dtype."""

    compute: int
    autocast: bool
    weights: int  # non-quantized weights (all weights for full / LoRA)
    adapter: int
    base: str  # dense | nf4 | int8


def precision_of(s: MemorySettings) -> Precision:
    compute = _dtype_bytes(s.compute_dtype)
    autocast = compute == 2
    if s.method == "full":
        # bf16 checkpoints train in pure bf16 (TRL loads dtype="auto"); fp16 needs fp32 master weights (AMP).
        weights = 4 if s.compute_dtype in ("float16", "float32") else 2
    elif s.method == "lora":
        weights = compute
    else:
        weights = 4 if s.kbit_upcast else compute
    if s.adapter_dtype == "auto":
        if s.method in ("qlora", "lora8bit"):
            adapter = 2  # TRL casts the adapters of a quantized model to bfloat16
        else:
            adapter = 4  # PEFT's autocast_adapter_dtype keeps adapters of a 16-bit base in fp32
    else:
        adapter = _dtype_bytes(s.adapter_dtype)
    base = {"qlora": "nf4", "lora8bit": "int8"}.get(s.method, "dense")
    return Precision(compute, autocast, weights, adapter, base)


def trace_plan(arch: ModelArch, s: MemorySettings, targets: list[str] | None = None) -> TracePlan:
    s = s.as_model_sees_it()
    p = precision_of(s)
    return TracePlan(
        batch=s.batch_size,
        seq_len=s.seq_len,
        compute_bytes=p.compute,
        autocast=p.autocast,
        residual_bytes=p.weights,
        norm_weight_bytes=p.weights,
        head_weight_bytes=p.weights,
        base=p.base,
        train_base=s.method == "full",
        lora_targets=frozenset(targets or []) if s.method != "full" else frozenset(),
        rank=s.rank,
        adapter_bytes=p.adapter,
        lora_dropout=s.lora_dropout > 0,
        dora=s.dora,
        attn=s.attn,
        padded=s.padded,
        device=s.device,
        input_requires_grad=s.gradient_checkpointing,
        loss=s.loss,
        liger=s.liger,
    )


# ------------------------------------------------------------------------ weights
def quantized_weight_bytes(arch: ModelArch, method: str, double_quant: bool,
                           block: int = ALLOCATOR_BLOCK) -> tuple[int, int]:
    """(packed data, constants) of the bitsandbytes-quantized block linears.

    NF4 packs two weights per byte and keeps one absmax per 64 weights: fp32, or with double
    quantization an 8-bit code plus one fp32 scale per 256 absmax values, a 256-entry fp32
    code book and an fp32 offset. Every weight also carries its 16-entry NF4 code book.
    LLM.int8 keeps one int8 per weight and an fp32 scale per output row. ``block`` is the
    allocator's rounding (512 bytes on CUDA; 1 gives the tensors' own sizes).
    """

    def _round_block(nbytes: int) -> int:
        return -(-nbytes // block) * block if nbytes else 0

    packed = constants = 0
    for layer in arch.linear_layers():
        n = layer.weight_numel
        if method == "qlora":
            packed += _round_block((n + 1) // 2)
            blocks = -(-n // NF4_BLOCK)
            if double_quant:
                constants += (
                    _round_block(blocks)
                    + _round_block(4 * -(-blocks // DQ_BLOCK))
                    + _round_block(256 * 4)
                    + _round_block(4)
                )
            else:
                constants += _round_block(4 * blocks)
            constants += _round_block(16 * 4)
        elif method == "lora8bit":
            packed += _round_block(n)
            constants += _round_block(4 * layer.out_features)
    return packed * arch.num_layers, constants * arch.num_layers


def unquantized_weight_tensors(arch: ModelArch, method: str) -> list[int]:
    """Element counts of the weights that stay in 16 or 32 bit."""
    tensors = [arch.embedding_params]
    if arch.lm_head_params:
        tensors.append(arch.lm_head_params)
    tensors += [arch.hidden_size] * (arch.num_layers * arch.norms_per_layer + 1)
    for layer in arch.linear_layers():
        if method in ("full", "lora"):
            tensors += [layer.weight_numel] * arch.num_layers
        if layer.bias:
            tensors += [layer.out_features] * arch.num_layers
    return tensors


def parameter_counts(arch: ModelArch, s: MemorySettings) -> dict[str, int]:
    """Total and trainable parameters, as PEFT's get_nb_trainable_parameters counts them."""
    s = s.normalized()
    if s.method == "full":
        return {"total": arch.total_params, "trainable": arch.total_params, "base": arch.total_params}
    targets = resolve_targets(arch, s.targets)
    adapters = sum(lora_param_tensors(arch, targets, s.rank, s.dora, lm_head_targeted(arch, s.targets)))
    return {"total": arch.total_params + adapters, "trainable": adapters, "base": arch.total_params}


# ------------------------------------------------------------------------ optimizer
def optimizer_state_bytes(tensors: list[int], param_bytes: list[int], optimizer: str,
                          embedding_index: int | None = None):
    """(in allocator, paged) bytes of optimizer states for parameters of these sizes."""
    allocated = paged = 0
    for index, (numel, width) in enumerate(zip(tensors, param_bytes)):
        if optimizer == "sgd":
            continue  # transformers' SGD has no momentum buffer
        if optimizer in ("adamw_torch_fused", "adamw_torch"):
            allocated += 2 * _round_block(numel * width) + (_round_block(4) if optimizer == "adamw_torch_fused" else 0)
            continue
        eight_bit = optimizer in ("adamw_8bit", "paged_adamw_8bit") and numel >= BNB_8BIT_MIN_NUMEL
        if index == embedding_index:
            eight_bit = False  # transformers registers nn.Embedding weights for 32-bit states
        if eight_bit:
            size = 2 * _round_block(numel) + 2 * _round_block(4 * -(-numel // BNB_8BIT_BLOCK))
        else:
            size = 2 * _round_block(numel * 4)
        if optimizer.startswith("paged") and numel >= PAGED_MIN_NUMEL:
            paged += size
        else:
            allocated += size
    return allocated, paged


# ------------------------------------------------------------------------ the estimate
def estimate(arch: ModelArch, settings: MemorySettings) -> MemoryEstimate:
    """Predict the memory of one training step of ``arch`` under ``settings``."""
    s = settings.normalized()
    p = precision_of(s)
    notes: list[str] = []
    if not arch.is_known_layout:
        notes.append(
            f"'{arch.model_type}' is not one of the block layouts modelled op by op (llama, mistral, qwen2, gemma2, "
            "phi3); it was treated as a Llama-style block."
        )
    if any(arch.config.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        notes.append("This is a mixture-of-experts model; the estimate treats its MLP as one dense MLP, so expect it "
                     "to be far off.")
    attn = s.attn
    if attn == "sdpa" and arch.attn_logit_softcapping:
        notes.append("Attention softcapping (Gemma 2) rules out SDPA: transformers runs eager attention, O(length^2).")
    if s.padding_free and attn in ("sdpa", "eager"):
        notes.append(f"Padding-free batches with {attn} attention: transformers builds a block-diagonal mask over all "
                     f"{s.batch_size * s.seq_len:,} tokens of a batch (tokens x tokens); flash attention needs none.")
    targets = resolve_targets(arch, s.targets) if s.method != "full" else []
    lm_head_lora = s.method != "full" and lm_head_targeted(arch, s.targets)
    reported, s = s, s.as_model_sees_it()  # shapes below are the forward pass's; the settings reported are asked
    plan = trace_plan(arch, s, targets)
    profile = activation_profile(arch, plan)
    tokens, h = s.batch_size * s.seq_len, arch.hidden_size
    cd = p.compute

    # Weights
    quantized, constants = quantized_weight_bytes(arch, s.method, s.double_quant)
    unquantized_tensors = unquantized_weight_tensors(arch, s.method)
    unquantized = sum(_round_block(n * p.weights) for n in unquantized_tensors)
    adapter_tensors = lora_param_tensors(arch, targets, s.rank, s.dora, lm_head_lora) if s.method != "full" else []
    per_module = 3 if s.dora else 2
    adapter_widths = [
        4 if (s.dora and (i % per_module) == 2) else p.adapter for i in range(len(adapter_tensors))
    ]
    adapters = sum(_round_block(n * w) for n, w in zip(adapter_tensors, adapter_widths))

    # Trainable tensors, their gradients and optimizer states
    if s.method == "full":
        trainable, widths = unquantized_tensors, [p.weights] * len(unquantized_tensors)
        embedding_index = 0
    else:
        trainable, widths, embedding_index = adapter_tensors, adapter_widths, None
    gradients = sum(_round_block(n * w) for n, w in zip(trainable, widths))
    opt_allocated, opt_paged = optimizer_state_bytes(trainable, widths, s.optimizer, embedding_index)
    opt_step_temp = 0
    if s.optimizer == "adamw_torch" and trainable:
        # foreach AdamW (the CUDA default) makes sqrt(v) for all tensors at once; on the CPU it goes tensor by tensor
        sizes = [_round_block(n * w) for n, w in zip(trainable, widths)]
        opt_step_temp = sum(sizes) if s.device == "cuda" else max(sizes)

    # Activations and the loss region
    ckpt = s.gradient_checkpointing
    saved_layers = profile.num_layers * profile.checkpoint_per_layer if ckpt else profile.layers_no_checkpointing
    activations = saved_layers + profile.shared + profile.embedding + profile.final_norm + profile.head
    logits_and_loss, loss_transient = loss_region_bytes(arch, s, p, profile)
    eager_masks = 0
    if attn == "eager" or (attn == "sdpa" and arch.attn_logit_softcapping):
        # transformers materialises an additive (batch, 1, length, length) mask per mask type for eager attention
        kinds = 2 if arch.block == "gemma2" else 1
        eager_masks = kinds * s.batch_size * s.seq_len * s.seq_len * p.weights
    layer_backward = layer_backward_bytes(arch, s, p, plan, profile)
    autocast_weight_cache = 0
    if s.method == "full" and p.autocast and p.weights != cd:
        autocast_weight_cache = sum(n * cd for n in unquantized_tensors[:1]) + arch.linear_weight_params * cd
        notes.append("Mixed precision with fp32 master weights: "
                     "autocast caches a 16-bit copy of every weight per step.")

    # The moments that can be the peak, each as the terms alive at that moment.
    static = {
        "quantized_weights": quantized,
        "quantization_constants": constants,
        "weights_16_32bit": unquantized,
        "adapter_weights": adapters,
        "optimizer_states": opt_allocated,
        "library_workspaces": CUBLAS_WORKSPACE_BYTES if s.device == "cuda" else 0,
    }
    accumulated = gradients if s.grad_accum > 1 else 0  # earlier micro-batches' gradients stay
    ckpt_inputs = saved_layers + profile.shared + profile.embedding
    candidates = {
        "backward start (loss)": {
            "activations": activations,
            "logits_and_loss": logits_and_loss,
            "transient_buffers": loss_transient + eager_masks + autocast_weight_cache,
            "gradients": accumulated,
        },
        ("last block recomputed in backward" if ckpt else "last block in backward"): {
            "activations": (ckpt_inputs + profile.per_layer) if ckpt else (activations - profile.head),
            "transient_buffers": layer_backward + eager_masks + autocast_weight_cache,
            "gradients": max(accumulated, _partial_grads(s, arch, p)),
        },
        "optimizer step": {"gradients": gradients, "transient_buffers": opt_step_temp},
    }
    if s.method == "full":
        # Gradients pile up while backward walks down the blocks, so the first block (all
        # gradients but the embedding's) competes with the last; then the embedding's own.
        embedding_grad = 0 if arch.tie_word_embeddings else _round_block(arch.embedding_params * p.weights)
        first_block = (profile.checkpoint_per_layer + profile.per_layer) if ckpt else profile.first_layer
        candidates["first block in backward"] = {
            "activations": profile.shared + profile.embedding + first_block,
            "transient_buffers": layer_backward + eager_masks + autocast_weight_cache,
            "gradients": gradients - embedding_grad,
        }
        candidates["end of backward"] = {
            "gradients": gradients,
            "activations": profile.embedding,
            "transient_buffers": 2 * tokens * h * 4,
        }
    phases = {name: sum(static.values()) + sum(parts.values()) for name, parts in candidates.items()}
    peak_phase = max(phases, key=lambda name: phases[name])
    peak = phases[peak_phase]
    terms = {name: 0 for name in MemoryEstimate.ALLOCATED_TERMS}
    terms.update(static)
    terms.update(candidates[peak_phase])
    terms["optimizer_states_paged"] = opt_paged
    assert sum(terms[name] for name in MemoryEstimate.ALLOCATED_TERMS) == peak, (terms, peak)
    if s.strategy != "none" and s.processes > 1:
        per_gpu = per_gpu_terms(arch, s, p, terms, gradients, notes)
        phases = {name: value + per_gpu - peak for name, value in phases.items()}
        peak = per_gpu
        opt_paged = terms["optimizer_states_paged"]

    # Reserved minus allocated: the caching allocator keeps freed blocks; short-lived
    # tensors of changing sizes fragment it more than the long-lived weights do.
    dynamic = peak - sum(terms[name] for name in ("quantized_weights", "quantization_constants", "weights_16_32bit",
                                                 "adapter_weights", "optimizer_states"))
    allocator_overhead = int(0.08 * dynamic + 0.01 * (peak - dynamic)) + 64 * MiB if s.device == "cuda" else 0
    context = CUDA_CONTEXT_BYTES if s.device == "cuda" else 0
    order = list(MemoryEstimate.ALLOCATED_TERMS)
    order.insert(order.index("optimizer_states") + 1, "optimizer_states_paged")
    terms = {name: terms[name] for name in order}
    terms["allocator_overhead"] = allocator_overhead
    terms["cuda_context"] = context
    reserved = peak + allocator_overhead
    nvidia_smi = reserved + context + opt_paged

    params = parameter_counts(arch, s)
    params["quantized"] = arch.linear_weight_params if s.method in ("qlora", "lora8bit") else 0
    explanations = explain_terms(arch, s, p, profile, peak_phase, targets, params)
    s = reported
    ledger = {label: size for label, size in sorted(profile.layer_ledger.items(), key=lambda kv: -kv[1])}
    return MemoryEstimate(
        model=arch.name,
        settings={**asdict(s), "targets_resolved": targets},
        terms=terms,
        explanations=explanations,
        peak_allocated_bytes=peak,
        reserved_bytes=reserved,
        nvidia_smi_bytes=nvidia_smi,
        peak_phase=peak_phase,
        phases=phases,
        parameters=params,
        activation_breakdown=ledger,
        notes=notes,
    )


def per_gpu_terms(arch: ModelArch, s: MemorySettings, p: Precision, terms: dict[str, int], gradients: int,
                  notes: list[str]) -> int:
    """One GPU's share of a multi-GPU step (``terms`` changed in place); returns the new peak allocated.

    DDP: every GPU holds the whole model, its gradients and optimizer states (replicated), plus
    the reducer's buckets, a flat copy of every trainable gradient that lives for the whole run
    (PyTorch's default ``gradient_as_bucket_view=False``). FSDP (FULL_SHARD): each GPU keeps
    1/shards of the weights, gradients and optimizer states, and gathers whole units while it
    computes them: the root unit (embeddings and LM head, not resharded after forward in FSDP1)
    and two decoder blocks (the one computing and the one prefetched). SHARD_GRAD_OP keeps every
    gathered weight from forward to backward; NO_SHARD is DDP; CPU offload moves the shards and
    optimizer states to CPU memory. Activations are per process already (the per-device batch).
    A model of the layout, not a measurement: a GPU machine must check it (bench/memory).
    """
    before = sum(terms[name] for name in MemoryEstimate.ALLOCATED_TERMS)
    weights = ("quantized_weights", "quantization_constants", "weights_16_32bit", "adapter_weights")
    if s.strategy == "ddp" or s.fsdp_sharding == "NO_SHARD":
        terms["gradients"] += gradients  # the reducer's buckets, alive from wrapping to the end
        notes.append(f"Per GPU, {s.processes} processes ({s.strategy}{'' if s.strategy == 'ddp' else ' NO_SHARD'}): "
                     "every GPU holds the whole model, gradients and optimizer states, plus DDP's gradient buckets.")
        return before + gradients
    shards = min(s.shards or s.processes, s.processes)
    total_weights = sum(terms[name] for name in weights)
    root = arch.embedding_params * p.weights * (1 if arch.tie_word_embeddings else 2)
    root = min(root, total_weights)
    block = (total_weights - root) // max(arch.num_layers, 1)
    gathered = root + 2 * block
    if s.fsdp_sharding == "SHARD_GRAD_OP":
        gathered = total_weights  # gathered in forward, kept until backward is done
    keep = 0 if s.fsdp_offload else 1
    for name in weights:
        terms[name] = keep * -(-terms[name] // shards)
    terms["gradients"] = keep * -(-terms["gradients"] // shards) + (0 if keep else block)
    terms["optimizer_states"] = keep * -(-terms["optimizer_states"] // shards)
    terms["optimizer_states_paged"] = keep * -(-terms["optimizer_states_paged"] // shards)
    terms["transient_buffers"] += gathered
    where = "in CPU memory (offload)" if s.fsdp_offload else f"1/{shards} on each GPU"
    notes.append(f"Per GPU, {s.processes} processes (fsdp {s.fsdp_sharding}): weights, gradients and optimizer "
                 f"states {where}; the units being computed are gathered whole ({gathered / GiB:.2f} GiB, counted "
                 "in transient buffers).")
    return sum(terms[name] for name in MemoryEstimate.ALLOCATED_TERMS)


def _partial_grads(s: MemorySettings, arch: ModelArch, p: Precision) -> int:
    """Gradients that exist while backward works through the last block (full fine-tuning):
    the LM head's and final norm's, and the block's own weights as they are produced."""
    if s.method != "full":
        return 0
    block = sum(layer.weight_numel + (layer.out_features if layer.bias else 0) for layer in arch.linear_layers())
    block += arch.norms_per_layer * arch.hidden_size
    return ((arch.lm_head_params or arch.embedding_params) + arch.hidden_size + block) * p.weights


def loss_region_bytes(arch: ModelArch, s: MemorySettings, p: Precision, profile: ActivationProfile) -> tuple[int, int]:
    """(kept, transient) bytes of the logits and loss at the start of backward.

    full_logits: transformers upcasts the logits to fp32 and log_softmax keeps its fp32
    output (4 bytes x batch x length x vocab); backward of nll_loss and log_softmax each
    make another fp32 tensor of that size, so 12 bytes per logit are alive at once.
    chunked: TRL's fused LM head scores 4096 tokens x 32768 vocabulary entries per tile and
    keeps only per-token vectors; its backward holds an fp32 gradient of the hidden states
    and, when the LM head is trained, an fp32 gradient of its weight.
    """
    tokens, h, vocab, cd = s.batch_size * s.seq_len, arch.hidden_size, arch.vocab_size, p.compute
    if s.loss == "full_logits" and s.liger:
        # Liger's fused linear cross-entropy: logits exist only for a chunk of rows at a time,
        # about tokens x hidden elements in all (chunk = next power of two of tokens / ceil(vocab / hidden)),
        # in the compute dtype plus Liger's fp32 accumulation; the hidden-state gradient it keeps is an activation.
        chunk = 1 << max(0, (-(-tokens // -(-vocab // h)) - 1).bit_length())
        return 0, chunk * vocab * (cd + 4) + tokens * h * 4
    if s.loss == "full_logits":
        kept = profile.logits
        transient = 2 * tokens * vocab * 4
        return kept, transient
    n = s.batch_size * (s.seq_len - 1)
    rows = min(n, TRL_TOKEN_TILE)
    transient = rows * TRL_VOCAB_TILE * cd  # the tile buffer is allocated at full width whatever the vocabulary
    if s.device == "cpu":
        transient += rows * min(vocab, TRL_VOCAB_TILE) * 29  # without Triton the fold runs as torch ops on the tile
    transient += n * h * 4 + n * h * p.weights  # fp32 gradient of the hidden states, and its cast back
    if p.weights != cd:
        # weight and hidden tiles cast to compute dtype
        transient += min(vocab, TRL_VOCAB_TILE) * h * cd + rows * h * cd
    if s.method == "full":
        transient += vocab * h * 4 + vocab * h * p.weights  # fp32 grad of the LM head weight and its cast
    return 0, transient


def layer_backward_bytes(arch: ModelArch, s: MemorySettings, p: Precision, plan: TracePlan,
                         profile: ActivationProfile) -> int:
    """The widest moment of one block in backward, over what the block keeps saved.

    With checkpointing the block first runs forward again; the symbolic forward tracks its
    widest moment (saved tensors so far, Python locals, and the momentary copies: PEFT's
    cast to fp32 adapters, bitsandbytes' clone of the base output, the scaled adapter
    output before it is added, DoRA's rebuilt weight). Then the block's backward holds
    the gradients of the two widest MLP tensors at once (for eager attention, of the
    length x length probabilities; for flash, an fp32 dQ accumulator beside dQ, dK, dV).
    Either way the gradient arriving from the block above is alive (in the residual dtype),
    and quantized bases dequantize the weight they multiply by. The CPU proofs compare this with live tensors op by op
    (tests/test_memory.py::test_peak_matches_live_tensors_on_cpu).
    """
    tokens, h, i, cd = s.batch_size * s.seq_len, arch.hidden_size, arch.intermediate_size, p.compute
    mlp = profile.per_layer + 2 * tokens * i * cd
    scores = s.batch_size * arch.num_heads * s.seq_len * s.seq_len
    if plan.attn == "eager" or arch.attn_logit_softcapping:
        # softmax backward: the fp32 gradient of the probabilities and its output, after the
        # compute-dtype probabilities were released by the P @ V backward
        attention = profile.saved_through_attention - scores * cd + 2 * scores * 4
    else:
        # flash backward: an fp32 accumulator for dQ next to dQ, dK, dV
        attention = (profile.saved_through_attention + tokens * arch.q_dim * 4
                     + tokens * (arch.q_dim + 2 * arch.kv_dim) * cd)
    widest = max(mlp, attention)
    if s.gradient_checkpointing:
        widest = max(widest, profile.recompute_peak)
    incoming = tokens * h * p.weights
    dequant = 0
    if p.base in ("nf4", "int8") and s.device == "cuda":
        dequant = max(layer.weight_numel for layer in arch.linear_layers()) * cd
    return widest - profile.per_layer + incoming + dequant


# ------------------------------------------------------------------------ explanations
def explain_terms(arch, s, p, profile, peak_phase, targets, params) -> dict[str, str]:
    """One sentence per term, for the table and the tab."""
    width = {2: "16-bit", 4: "fp32"}[p.weights]
    adapter_width = {2: "bf16", 4: "fp32"}[p.adapter]
    quantized = s.method in ("qlora", "lora8bit")
    kept = f"Embeddings{', LM head' if arch.lm_head_params else ' (tied to the LM head)'}, norms"
    kept += " and biases" if arch.qkv_bias else ""
    if not quantized:
        kept += f" and all {arch.num_layers} blocks in {width}."
    elif s.kbit_upcast:
        kept += " in fp32 (prepare_model_for_kbit_training upcasts every non-quantized weight)."
    else:
        kept += f" in {width}."
    if s.method == "qlora":
        packed = (f"{params['quantized']:,} block weights packed at 4 bits (two per byte), "
                  "as bitsandbytes NF4 stores them.")
        absmax = "one absmax per 64 weights" + (
            ", itself quantized to 8 bit with one fp32 scale per 256 (double quantization)"
            if s.double_quant else " in fp32")
        constants = absmax[0].upper() + absmax[1:] + ", plus the NF4 code book of each weight."
    elif s.method == "lora8bit":
        packed = f"{params['quantized']:,} block weights as int8 (LLM.int8)."
        constants = "One fp32 scale per output row of every int8 weight."
    else:
        packed, constants = "No quantized weights.", "None."
    if s.method == "full":
        adapters = "No adapters: every weight is trained."
    else:
        adapters = (f"LoRA A and B (rank {s.rank}) on {', '.join(targets)} in {adapter_width}"
                    + (" plus DoRA magnitudes in fp32" if s.dora else "")
                    + f": {params['trainable']:,} trainable parameters.")
    all_grads = peak_phase in ("optimizer step", "end of backward")
    per_token = profile.per_layer / max(1, s.batch_size * s.seq_len)
    kept_for_backward = "one input per block (gradient checkpointing)" if s.gradient_checkpointing else "every block"
    if s.liger:
        kept_for_backward += "; Liger's RMSNorm and SwiGLU keep fewer of them"
    if s.padded and s.attn != "eager":
        kept_for_backward += "; the attention mask" + (" (block-diagonal: padding-free)" if s.batch_size == 1 else "")
    return {
        "quantized_weights": packed,
        "quantization_constants": constants,
        "weights_16_32bit": kept,
        "adapter_weights": adapters,
        "gradients": "One gradient per trainable weight, in its dtype; at this peak "
        + ("all of them exist." if all_grads else "only those computed so far exist."),
        "optimizer_states": _optimizer_sentence(s),
        "optimizer_states_paged": (
            "Paged optimizers keep tensors of 100k+ elements in CUDA managed memory: outside PyTorch's allocator "
            "(not in max_memory_allocated) but counted by nvidia-smi while resident."
            if s.optimizer.startswith("paged") else "None: the optimizer is not paged."
        ),
        "activations": f"Tensors saved for backward, {kept_for_backward}, following the {arch.block} block's ops "
        f"({per_token:,.0f} bytes per token per block without checkpointing).",
        "logits_and_loss": (
            "Liger's fused linear cross-entropy: no logits are kept; its chunks are transient buffers."
            if s.loss == "full_logits" and s.liger
            else "Full logits: the fp32 log-softmax of batch x length x vocabulary, kept for backward."
            if s.loss == "full_logits"
            else "TRL's chunked loss keeps only per-token values; its tiles are counted as transient buffers."
        ),
        "transient_buffers": f"Short-lived tensors alive at the peak ({peak_phase}): gradients of the widest tensors, "
        "loss tiles, input copies, dequantized weights, optimizer temporaries.",
        "library_workspaces": "cuBLAS and cuBLASLt workspaces, allocated through PyTorch's caching allocator.",
        "allocator_overhead": "Memory the caching allocator has reserved but not handed out (block rounding, "
        "fragmentation): nvidia-smi shows it, max_memory_allocated does not.",
        "cuda_context": "CUDA context, kernels and library handles of the training process (nvidia-smi only).",
    }


def _optimizer_sentence(s: MemorySettings) -> str:
    return {
        "adamw_torch_fused": "AdamW (fused): exp_avg and exp_avg_sq in each trainable weight's dtype, "
                             "created at the first step.",
        "adamw_torch": "AdamW (foreach): two states per trainable weight; "
                       "the step makes one more state-sized temporary.",
        "paged_adamw_32bit": "Paged AdamW 32-bit: two fp32 states; tensors under 100k elements stay in the allocator.",
        "adamw_8bit": "8-bit AdamW: two uint8 states with one fp32 absmax per 256 values "
                      "(fp32 states under 4096 elements).",
        "paged_adamw_8bit": "Paged 8-bit AdamW: uint8 states, paged from 100k elements.",
        "sgd": "SGD without momentum: no optimizer state.",
    }[s.optimizer]


# ------------------------------------------------------------------------ fitting
def fits_on_gpus(estimate_: MemoryEstimate) -> dict[str, dict]:
    """For each common card: does the nvidia-smi figure fit, and with how much room."""
    result = {}
    for gpu, total in GPUS.items():
        need = estimate_.nvidia_smi_bytes
        note = ""
        if gpu in NO_BF16 and estimate_.settings.get("compute_dtype") == "bfloat16":
            note = "no bfloat16 on this card: train in float16"
        result[gpu] = {"fits": need <= total, "total_bytes": total, "free_bytes": total - need, "note": note}
    return result


def max_batch_or_seq_that_fits(
    arch: ModelArch, settings: MemorySettings, gpu: str | int, vary: str = "batch_size", limit: int | None = None
) -> int:
    """The largest batch size (or sequence length) whose nvidia-smi estimate fits the card; 0 if none."""
    capacity = GPUS[gpu] if isinstance(gpu, str) else int(gpu)
    if vary not in ("batch_size", "seq_len"):
        raise ConfigError("vary", "must be 'batch_size' or 'seq_len'.")
    low = 1 if vary == "batch_size" else 2
    high = limit or (4096 if vary == "batch_size" else int(arch.config.get("max_position_embeddings") or 131072))

    def fits(value: int) -> bool:
        return estimate(arch, replace(settings, **{vary: value})).nvidia_smi_bytes <= capacity

    if not fits(low):
        return 0
    if fits(high):
        return high
    while high - low > 1:  # memory grows monotonically with both, so bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ------------------------------------------------------------------------ run configs
def settings_from_run_config(config) -> tuple[str, MemorySettings]:
    """The memory settings of a ``RunConfig``, and its base model's name.

    The method is ``RunConfig.method`` (its one owner): dora and rslora are LoRA here (DoRA
    adds its magnitude vectors). Quantized bases compute in ``quant.bnb_4bit_compute_dtype``
    as the worker loads them; batches of more than one row are padded unless padding-free (asked
    for, or implied by bfd packing: ``engine.config.build.is_padding_free``, its one owner).
    """
    from engine.config.build import is_padding_free  # torch-free at import
    model, lora, quant, train = config.model, config.lora, config.quant, config.train
    method = {"dora": "lora", "rslora": "lora"}.get(config.method, config.method)
    compute = "bfloat16" if train.bf16 else "float32"
    if method in ("qlora", "lora8bit") and compute != "float32":
        compute = quant.bnb_4bit_compute_dtype  # the worker loads quantized bases in this dtype
    attn = {"flash_attention_2": "flash", "flash_attention_3": "flash"}.get(model.attn_implementation,
                                                                          model.attn_implementation)
    batch = int(train.per_device_train_batch_size)
    settings = MemorySettings(
        method=method,
        rank=int(lora.r),
        alpha=int(lora.lora_alpha),
        targets=lora.target_modules,
        dora=bool(lora.use_dora),
        lora_dropout=float(lora.lora_dropout),
        batch_size=batch,
        seq_len=int(train.max_length),
        gradient_checkpointing=bool(train.gradient_checkpointing),
        optimizer=str(train.optim),
        compute_dtype=compute,
        double_quant=bool(quant.bnb_4bit_use_double_quant),
        attn=attn if attn in ATTENTION else "sdpa",
        padded=batch > 1 and not train.packing and not is_padding_free(config),
        padding_free=is_padding_free(config),
        liger=bool(train.use_liger_kernel),
        grad_accum=int(train.gradient_accumulation_steps),
        **distributed_settings(config),
    )
    return model.name_or_path, settings


def distributed_settings(config) -> dict:
    """The memory settings of a run's ``distributed`` section (per-GPU estimate)."""
    dist = config.distributed
    if dist.strategy == "none":
        return {}
    shards = dist.num_processes if dist.fsdp_sharding_strategy == "HYBRID_SHARD" else dist.world_size
    return {"strategy": dist.strategy, "processes": dist.world_size, "fsdp_sharding": dist.fsdp_sharding_strategy,
            "shards": shards, "fsdp_offload": bool(dist.fsdp_offload_params)}


def estimate_for_run_config(config) -> MemoryEstimate:
    """Estimate for a ``RunConfig`` (see settings_from_run_config for the mapping)."""
    name, settings = settings_from_run_config(config)
    return estimate(load_arch(name), settings)


# ------------------------------------------------------------------------ command line
def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def per_gpu_label(settings: dict) -> str:
    """' per GPU (4 processes, fsdp FULL_SHARD)' for a multi-GPU estimate, else ''."""
    if settings.get("strategy", "none") == "none" or settings.get("processes", 1) <= 1:
        return ""
    fsdp = settings["strategy"] == "fsdp"
    how = settings["strategy"] + (f" {settings.get('fsdp_sharding')}" if fsdp else "")
    offload = ", CPU offload" if fsdp and settings.get("fsdp_offload") else ""
    return f" per GPU ({settings['processes']} processes, {how}{offload})"


def format_table(est: MemoryEstimate) -> str:
    lines = [
        f"{est.model}: {METHOD_LABELS[est.settings['method']]}{per_gpu_label(est.settings)}, batch "
        f"{est.settings['batch_size']} x "
        f"{est.settings['seq_len']} tokens{' (padding-free)' if est.settings.get('padding_free') else ''}, "
        f"checkpointing {'on' if est.settings['gradient_checkpointing'] else 'off'}, {est.settings['optimizer']}"
        f"{', Liger kernels' if est.settings.get('liger') else ''}",
        f"parameters: {est.parameters['total']:,} total, {est.parameters['trainable']:,} trainable",
        "",
        f"{'term':<26}{'GiB':>9}  explanation",
    ]
    for name, value in est.terms.items():
        if value == 0 and name not in ("activations",):
            continue
        lines.append(f"{TERM_TITLES.get(name, name):<26}{value / GiB:>9.3f}  {est.explanations.get(name, '')}")
    lines += [
        "",
        f"{'peak allocated (torch)':<26}{est.peak_allocated_bytes / GiB:>9.3f}  at: {est.peak_phase}",
        f"{'nvidia-smi':<26}{est.nvidia_smi_bytes / GiB:>9.3f}",
        "",
        est.advice(),
    ]
    fits = fits_on_gpus(est)
    lines.append("fits: " + ", ".join(f"{gpu} {'yes' if row['fits'] else 'no'}" for gpu, row in fits.items()))
    lines += [f"note: {note}" for note in est.notes]
    return "\n".join(lines)
