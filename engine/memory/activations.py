"""Activation memory, counted tensor by tensor from the forward pass of the model's real block.

Activation memory is the set of tensors autograd keeps between the forward and the
backward pass. Rules of thumb ("34*s*b*h bytes per layer") miss what decides it in
practice: which dtype each tensor has (RMSNorm upcasts to fp32; a QLoRA base prepared by
``prepare_model_for_kbit_training`` carries an fp32 residual stream), which tensors are
copies (PEFT casts each LoRA input to the adapter dtype, autocast casts it back, so every
adapted linear keeps its own copy), which ops save their inputs (a frozen linear saves
nothing; SiLU saves its input; a product saves both factors), and whether grouped-query
keys are repeated before attention (only when an attention mask is present).

So instead of a formula, this module runs the forward pass *symbolically*: each op of the
Hugging Face implementation of the block (``modeling_llama``, ``modeling_gemma2``,
``modeling_phi3``) is a small function below that creates tensors of the right size and
dtype and records which of them autograd saves, keyed by storage so that a tensor saved
by three ops counts once. The test suite runs the same configurations through real
models on the CPU and compares these numbers with the bytes that
``torch.autograd.graph.saved_tensors_hooks`` sees.

Pure Python, no torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.memory.arch import ModelArch

FP32 = 4


@dataclass(frozen=True)
class TracePlan:
    """Everything about dtypes and trainability that decides which tensors exist."""

    batch: int
    seq_len: int
    compute_bytes: int  # bytes per element of the compute dtype (2 for bf16/fp16)
    autocast: bool  # Trainer bf16/fp16=True runs the forward under torch.autocast
    residual_bytes: int  # dtype of the embedding output, hence of the residual stream
    norm_weight_bytes: int
    head_weight_bytes: int
    base: str  # "dense" (nn.Linear), "nf4" (bnb Linear4bit) or "int8" (bnb Linear8bitLt)
    train_base: bool  # full fine-tuning: every weight requires grad
    lora_targets: frozenset = frozenset()
    rank: int = 0
    adapter_bytes: int = 4
    lora_dropout: bool = False
    dora: bool = False
    attn: str = "sdpa"  # sdpa | flash | eager
    padded: bool = False  # batches carry an attention mask (padding)
    device: str = "cuda"  # cuda | cpu: dropout masks and the chunked loss differ
    input_requires_grad: bool = False  # enable_input_require_grads (checkpointing with PEFT)
    loss: str = "chunked"  # chunked (TRL fused LM head) | full_logits (transformers loss)
    # Liger kernels: RMSNorm keeps its input and one fp32 rstd per row (no fp32 copy), SwiGLU/GEGLU
    # keep their two inputs and recompute the activation in backward (liger_kernel.ops rms_norm.py,
    # swiglu.py: ``ctx.save_for_backward``); with full_logits, the fused linear cross-entropy.
    liger: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass
class Sym:
    """A symbolic tensor: size, dtype width, requires_grad, and which storage it lives in."""

    numel: int
    itemsize: int
    grad: bool
    storage: int
    storage_bytes: int
    shared: bool = False  # created once per forward and used by every layer (RoPE cos/sin, mask)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


_ids = itertools.count(1)


def new(numel: int, itemsize: int, grad: bool, shared: bool = False) -> Sym:
    return Sym(numel, itemsize, grad, next(_ids), numel * itemsize, shared)


def view(t: Sym, numel: int | None = None, grad: bool | None = None) -> Sym:
    """A view: same storage, possibly fewer elements (a slice or a chunk)."""
    return Sym(numel if numel is not None else t.numel, t.itemsize, t.grad if grad is None else grad,
               t.storage, t.storage_bytes, t.shared)


@dataclass
class Trace:
    """The tensors saved for backward during one symbolic forward, deduplicated by storage."""

    plan: TracePlan
    saved: dict = field(default_factory=dict)  # storage id -> (label, bytes)
    shared_saved: dict = field(default_factory=dict)
    hidden_saved: dict = field(default_factory=dict)  # kept by bnb ctx.tensors, invisible to saved-tensor hooks

    held: list = field(default_factory=list)  # tensors Python locals keep alive right now
    saved_through_attention: int = 0  # what is still saved when backward reaches attention
    peak_live: int = 0  # widest moment of the forward: saved so far + held + momentary tensors

    def is_saved(self, t: Sym) -> bool:
        return t.storage in self.saved or t.storage in self.hidden_saved or t.storage in self.shared_saved

    def moment(self, *temps: Sym | None) -> None:
        """Record a point of the forward where ``temps`` (and everything held) are alive at once."""
        live = self.total
        seen: set[int] = set()
        for t in [*self.held, *temps]:
            if t is None or t.shared or t.storage in seen or self.is_saved(t):
                continue
            seen.add(t.storage)
            live += t.storage_bytes
        self.peak_live = max(self.peak_live, live)

    def hold(self, *tensors: Sym | None) -> None:
        self.held.extend(t for t in tensors if t is not None)

    def drop(self, *tensors: Sym | None) -> None:
        for t in tensors:
            if t is not None and t in self.held:
                self.held.remove(t)

    def save(self, t: Sym | None, label: str, hidden: bool = False) -> None:
        if t is None:
            return
        target = self.shared_saved if t.shared else (self.hidden_saved if hidden else self.saved)
        if t.storage not in self.saved and t.storage not in self.hidden_saved and t.storage not in target:
            target[t.storage] = (label, t.storage_bytes)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.saved.values()) + sum(size for _, size in self.hidden_saved.values())

    @property
    def hook_visible(self) -> int:
        return sum(size for _, size in self.saved.values())

    def by_label(self) -> dict[str, int]:
        grouped: dict[str, int] = {}
        for label, size in itertools.chain(self.saved.values(), self.hidden_saved.values()):
            grouped[label] = grouped.get(label, 0) + size
        return grouped


# ------------------------------------------------------------------------ op rules
def to_dtype(t: Sym, itemsize: int) -> Sym:
    """``tensor.to(dtype)``: the same tensor when nothing changes, else a copy (saves nothing)."""
    return t if t.itemsize == itemsize else new(t.numel, itemsize, t.grad)


def autocast_input(tr: Trace, t: Sym) -> Sym:
    """What a matmul-class op sees under autocast: a compute-dtype copy of anything else."""
    return to_dtype(t, tr.plan.compute_bytes) if tr.plan.autocast else t


def promote(a: int, b: int) -> int:
    return max(a, b)


def base_linear(tr: Trace, x: Sym, out_features: int, label: str) -> Sym:
    """The frozen or trainable base layer of a linear (nn.Linear or a bitsandbytes layer)."""
    plan = tr.plan
    if plan.base in ("nf4", "int8"):
        # bnb Linear4bit: x.to(compute_dtype) (a copy when x is fp32), MatMul4Bit keeps only the
        # packed weight, and the output is cast back to the input dtype. MatMul8bitLt keeps its
        # input A in ctx.tensors whenever A requires grad.
        if plan.base == "int8" and x.grad:
            tr.save(x, f"{label}: 8-bit matmul input", hidden=True)
        x_c = to_dtype(x, plan.compute_bytes)
        out_c = new(plan.tokens * out_features, plan.compute_bytes, x.grad)
        tr.moment(x, x_c, out_c)
        out = to_dtype(out_c, x.itemsize)
        tr.moment(x, out_c, out)
        return out
    x_in = autocast_input(tr, x)
    if plan.train_base:
        tr.save(x_in, f"{label}: input (for the weight gradient)")
    out_bytes = plan.compute_bytes if plan.autocast else x.itemsize
    out = new(plan.tokens * out_features, out_bytes, x.grad or plan.train_base)
    tr.moment(x, x_in, out)
    return out


def linear(tr: Trace, x: Sym, name: str, in_features: int, out_features: int, label: str) -> Sym:
    """A block linear with its LoRA adapter when ``name`` is targeted (PEFT lora.Linear / lora.bnb)."""
    plan = tr.plan
    tokens = plan.tokens
    result = base_linear(tr, x, out_features, label)
    if name not in plan.lora_targets:
        return result
    bnb = plan.base in ("nf4", "int8")
    if bnb:
        clone = new(result.numel, result.itemsize, result.grad)  # "defensively clone" the base output
        tr.moment(x, result, clone)
        result = clone
    if bnb and plan.autocast:
        x_lora = x  # lora/bnb.py casts only when autocast is off
    else:
        x_lora = to_dtype(x, plan.adapter_bytes)  # _cast_input_dtype: x.to(lora_A.weight.dtype)
    held = (x, result, x_lora)
    tr.hold(*held)
    norm_bytes = x_lora.itemsize
    if plan.lora_dropout:
        # Each adapter has its own nn.Dropout: CUDA keeps a bool mask, the CPU kernel a
        # mask in the input dtype, and the dropped-out copy is what lora_A sees.
        # Autograd keeps the mask only when the input needs a gradient.
        mask_bytes = 1 if plan.device == "cuda" else x_lora.itemsize
        if x_lora.grad:
            tr.save(new(x_lora.numel, mask_bytes, False), f"{label}: LoRA dropout mask")
        x_lora = new(x_lora.numel, x_lora.itemsize, x_lora.grad)
    a_in = autocast_input(tr, x_lora)
    tr.save(a_in, f"{label}: LoRA input")
    if plan.autocast and plan.adapter_bytes != plan.compute_bytes:
        # autocast casts the fp32 adapter weights once per forward; a matmul keeps the cast of A
        # only when its input needs a gradient, the cast of B always.
        if a_in.grad:
            tr.save(new(plan.rank * in_features, plan.compute_bytes, False), f"{label}: LoRA weights cast")
        tr.save(new(plan.rank * out_features, plan.compute_bytes, False), f"{label}: LoRA weights cast")
    tr.moment(x_lora, a_in)
    a_bytes = plan.compute_bytes if plan.autocast else plan.adapter_bytes
    a_out = new(tokens * plan.rank, a_bytes, True)
    tr.save(a_out, f"{label}: LoRA A output")
    b_out = new(tokens * out_features, a_bytes, True)
    scaled = new(tokens * out_features, a_bytes, True)
    tr.moment(b_out, scaled)
    if plan.dora:
        # DoRA: (m/||W+BA|| - 1) * base_result + m/||W+BA|| * lora_result * scaling saves both products' inputs.
        if plan.lora_dropout:
            # With dropout PEFT recomputes the base output as F.linear(x, W) with the dequantized weight,
            # which autograd keeps (a compute-dtype copy of the whole weight) along with its input.
            tr.save(new(in_features * out_features, plan.compute_bytes, False), f"{label}: DoRA weight copy")
            result_for_dora = new(tokens * out_features, plan.compute_bytes, True)
        else:
            result_for_dora = result
        # Rebuilding W + scaling*BA for its norm: an identity as wide as the input goes through
        # both adapter matrices (autograd keeps that chain while the DoRA forward runs), and the
        # (dequantized) weight is cast to the input's dtype; locals keep both until it returns.
        x_bytes = x_lora.itemsize
        eye_cast = new(in_features * in_features, plan.compute_bytes if plan.autocast else plan.adapter_bytes, False)
        eye_a = new(in_features * plan.rank, a_bytes, False)
        tr.moment(new(in_features * in_features, plan.adapter_bytes, False), eye_cast, eye_a)
        lora_w = new(in_features * out_features, a_bytes, False)
        dora_locals = [eye_cast, eye_a, lora_w, to_dtype(lora_w, x_bytes)]
        if plan.base in ("nf4", "int8"):
            dequantized = new(in_features * out_features, plan.compute_bytes, False)
            dora_locals += [dequantized, to_dtype(dequantized, x_bytes)]
        elif x_bytes != plan.compute_bytes:
            dora_locals.append(new(in_features * out_features, x_bytes, False))
        tr.hold(*dora_locals)
        tr.moment(new(in_features * out_features, x_bytes, False), new(in_features * out_features, x_bytes, False))
        tr.save(result_for_dora, f"{label}: DoRA base output")
        tr.save(b_out, f"{label}: DoRA LoRA output")
        # magnitude / ||W + BA|| keeps the norm (in the input's dtype) and the fp32 scale; the
        # (scale - 1) factor is kept only when the base output needs a gradient.
        tr.save(new(out_features, norm_bytes, False), f"{label}: DoRA norms")
        tr.save(new(out_features, FP32, True), f"{label}: DoRA norms")
        if result_for_dora.grad:
            tr.save(new(out_features, FP32, True), f"{label}: DoRA norms")
        tr.moment(*(new(tokens * out_features, FP32, True) for _ in range(3)))
        tr.drop(*dora_locals)
    if bnb:
        out_bytes = promote(result.itemsize, b_out.itemsize)
    else:
        out_bytes = result.itemsize  # result.to(torch_result_dtype)
    out = new(tokens * out_features, out_bytes, True)
    tr.moment(scaled, out)
    tr.drop(*held)
    return out


def rms_norm(tr: Trace, x: Sym, style: str, label: str) -> Sym:
    """RMSNorm: Llama normalises in fp32 and casts back before the weight; Gemma stays in fp32 to the end."""
    plan = tr.plan
    tokens = plan.tokens
    trainable = plan.train_base
    if plan.liger:
        # LigerRMSNormFunction: saves X (the input itself) and RSTD (fp32, one per row); Y has X's dtype.
        if x.grad or trainable:
            tr.save(x, f"{label}: input (Liger)")
            tr.save(new(tokens, FP32, True), f"{label}: rstd (Liger)")
        out = new(x.numel, x.itemsize, x.grad or trainable)
        tr.moment(x, out)
        return out
    x32 = to_dtype(x, FP32)
    if x.grad:
        tr.save(x32, f"{label}: fp32 input")
        tr.save(new(tokens, FP32, True), f"{label}: rsqrt")
    normalized32 = new(x.numel, FP32, x.grad)
    tr.moment(x, x32, normalized32)
    if style == "gemma":
        if x.grad:
            tr.save(new(arch_hidden(x, plan), FP32, trainable), f"{label}: 1 + weight (fp32)")
        normalized = normalized32
        if trainable:
            tr.save(normalized, f"{label}: normalized (for the weight gradient)")
        out32 = new(x.numel, FP32, x.grad or trainable)
        out = to_dtype(out32, x.itemsize)  # type_as(x)
        tr.moment(x, normalized, out32, out)
        return out
    normalized = to_dtype(normalized32, x.itemsize)
    if trainable:
        tr.save(normalized, f"{label}: normalized (for the weight gradient)")
    out = new(x.numel, promote(plan.norm_weight_bytes, x.itemsize), x.grad or trainable)
    tr.moment(x, normalized32, normalized, out)
    return out


def arch_hidden(x: Sym, plan: TracePlan) -> int:
    return x.numel // plan.tokens


def rotary(tr: Trace, t: Sym, cos: Sym, sin: Sym) -> Sym:
    """q*cos + rotate_half(q)*sin: the products save cos and sin (shared by all layers)."""
    if t.grad:
        tr.save(cos, "RoPE cos/sin")
        tr.save(sin, "RoPE cos/sin")
    width = promote(t.itemsize, cos.itemsize)
    out = new(t.numel, width, t.grad)
    # q*cos, rotate_half(q) (a negated half and a cat), and its product with sin exist together
    tr.moment(t, new(t.numel, width, False), new(t.numel, t.itemsize, False), new(t.numel, width, False), out)
    return out


def attention(tr: Trace, arch: ModelArch, q: Sym, k: Sym, v: Sym, mask: Sym | None) -> Sym:
    """SDPA / flash / eager attention; returns the (batch, seq, heads*head_dim) output."""
    plan = tr.plan
    b, s = plan.batch, plan.seq_len
    heads, groups = arch.num_heads, arch.kv_groups
    grad = q.grad or k.grad or v.grad
    impl = plan.attn
    if impl == "sdpa" and arch.attn_logit_softcapping:
        impl = "eager"  # transformers refuses sdpa with softcapping (Gemma 2)
    q, k, v = (autocast_input(tr, t) for t in (q, k, v))
    if impl == "eager":
        k_rep = new(k.numel * groups, k.itemsize, k.grad) if groups > 1 else k
        v_rep = new(v.numel * groups, v.itemsize, v.grad) if groups > 1 else v
        if grad:
            tr.save(q, "attention: query")
            tr.save(k_rep, "attention: key (repeated per head)" if groups > 1 else "attention: key")
        scores = b * heads * s * s
        cd = q.itemsize
        if arch.attn_logit_softcapping and grad:
            tr.save(new(scores, cd, True), "attention: tanh(scores) for softcapping")
        if grad:
            tr.save(new(scores, FP32, True), "attention: softmax output (fp32)")
            tr.save(new(scores, cd, True), "attention: probabilities (compute dtype)")
            tr.save(v_rep, "attention: value (repeated per head)" if groups > 1 else "attention: value")
        return new(q.numel, cd, grad)  # transpose(1, 2).contiguous()
    padded = mask is not None
    if padded and impl == "sdpa" and groups > 1:
        # With a mask, transformers repeats K and V per query head before calling SDPA.
        k = new(k.numel * groups, k.itemsize, k.grad)
        v = new(v.numel * groups, v.itemsize, v.grad)
    if padded and impl == "flash":
        # flash-attn's varlen path gathers the unpadded tokens into new tensors.
        q, k, v = (new(t.numel, t.itemsize, t.grad) for t in (q, k, v))
    if not grad:
        return new(q.numel, q.itemsize, False)
    tr.save(q, "attention: query")
    tr.save(k, "attention: key")
    tr.save(v, "attention: value")
    out = new(q.numel, q.itemsize, True)
    tr.save(out, "attention: output")
    lse_len = -(-s // 32) * 32 if (padded and impl == "sdpa" and plan.device == "cuda") else s
    tr.save(new(b * heads * lse_len, FP32, True), "attention: logsumexp")
    if padded and impl == "sdpa":
        # SDPA turns the boolean mask into an additive one in the query dtype on every call
        # and keeps it for backward (memory-efficient kernel on CUDA, flash kernel on CPU).
        tr.save(new(b * s * (-(-s // 16) * 16 if plan.device == "cuda" else s), q.itemsize, False),
                "attention: additive mask")
    if padded and impl == "flash":
        return new(q.numel, q.itemsize, True)  # flash-attn pads the output back into a new tensor
    if arch.block == "phi3":
        # Queries sliced out of the fused qkv output come out of RoPE laid out as (batch, heads,
        # seq, dim); the kernels lay the output out like the query, so .contiguous() copies.
        return new(q.numel, q.itemsize, True)
    # Otherwise the query (and so the output) is laid out as (batch, seq, heads, dim) and
    # transformers' transpose(1, 2).contiguous() is free: o_proj reads the saved output.
    return view(out)


def activation(tr: Trace, gate: Sym, label: str) -> Sym:
    """SiLU / GELU save their input."""
    if gate.grad:
        tr.save(gate, f"{label}: activation input")
    return new(gate.numel, gate.itemsize, gate.grad)


def product(tr: Trace, a: Sym, b: Sym, label: str) -> Sym:
    """a * b saves each factor for the other's gradient."""
    if b.grad:
        tr.save(a, f"{label}")
    if a.grad:
        tr.save(b, f"{label}")
    return new(max(a.numel, b.numel), promote(a.itemsize, b.itemsize), a.grad or b.grad)


def add(a: Sym, b: Sym) -> Sym:
    return new(max(a.numel, b.numel), promote(a.itemsize, b.itemsize), a.grad or b.grad)


# ------------------------------------------------------------------------ blocks
def decoder_layer(tr: Trace, arch: ModelArch, x: Sym, cos: Sym, sin: Sym, mask: Sym | None) -> Sym:
    """One decoder block of ``arch``, following its Hugging Face forward()."""
    plan = tr.plan
    tokens, i = plan.tokens, arch.intermediate_size
    style = "gemma" if arch.block == "gemma2" else "llama"
    layers = arch.linear_by_name()

    def lin(t: Sym, name: str) -> Sym:
        layer = layers[name]
        return linear(tr, t, name, layer.in_features, layer.out_features, name)

    # tr.hold / tr.drop follow the Python locals of the Hugging Face forward, which keep
    # tensors alive until the function returns or the name is rebound.
    normed = rms_norm(tr, x, style, "input norm")
    tr.hold(normed)
    if arch.block == "phi3":
        qkv = lin(normed, "qkv_proj")
        tr.hold(qkv)
        q = view(qkv, tokens * arch.q_dim)
        k = view(qkv, tokens * arch.kv_dim)
        v = view(qkv, tokens * arch.kv_dim)
    else:
        q = lin(normed, "q_proj")
        tr.hold(q)
        k = lin(normed, "k_proj")
        tr.hold(k)
        v = lin(normed, "v_proj")
        tr.hold(v)
    q2 = rotary(tr, q, cos, sin)
    tr.hold(q2)
    k2 = rotary(tr, k, cos, sin)
    tr.hold(k2)
    tr.drop(q, k)
    attn_out = attention(tr, arch, q2, k2, v, mask)
    tr.saved_through_attention = tr.total
    tr.hold(attn_out)
    o = lin(attn_out, "o_proj")
    tr.drop(normed, q2, k2, v, attn_out)
    if arch.block == "phi3":
        tr.drop(qkv)
    if arch.block == "gemma2":
        o = rms_norm(tr, o, style, "post-attention norm")
    x2 = add(x, o)
    tr.moment(o, x2)
    tr.hold(x2)
    normed = rms_norm(tr, x2, style, "post-attention norm" if arch.block != "gemma2" else "pre-MLP norm")
    tr.hold(normed)
    if arch.block == "phi3":
        gate_up = lin(normed, "gate_up_proj")
        gate, up = view(gate_up, tokens * i), view(gate_up, tokens * i)
        tr.hold(gate_up)
    else:
        gate = lin(normed, "gate_proj")
        tr.hold(gate)
        up = lin(normed, "up_proj")
        tr.hold(up)
    if plan.liger:
        # LigerSiLUMulFunction / LigerGELUMulFunction save their two inputs (made contiguous:
        # Phi-3's chunks of gate_up are copied) and recompute the activation in backward.
        if arch.block == "phi3":
            gate, up = new(gate.numel, gate.itemsize, gate.grad), new(up.numel, up.itemsize, up.grad)
        if gate.grad or up.grad:
            tr.save(gate, "MLP: gate (Liger)")
            tr.save(up, "MLP: up (Liger)")
        hidden = new(tokens * i, promote(gate.itemsize, up.itemsize), gate.grad or up.grad)
        tr.moment(gate, up, hidden)
    else:
        act = activation(tr, gate, "MLP")
        tr.moment(act)
        hidden = product(tr, act, up, "MLP: gate and up factors")
        tr.moment(act, hidden)
    tr.drop(gate, up)
    if arch.block == "phi3":
        tr.drop(gate_up)
    m = lin(hidden, "down_proj")
    tr.drop(normed)
    if arch.block == "gemma2":
        m = rms_norm(tr, m, style, "post-MLP norm")
    out = add(x2, m)
    tr.moment(m, out)
    tr.drop(x2)
    return out


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes of a whole forward pass, by region."""

    first_layer: int  # layer 0 (its input may not require grad)
    per_layer: int  # every other layer
    per_layer_hook_visible: int
    first_layer_hook_visible: int
    layer_ledger: dict  # label -> bytes for one (non-first) layer
    checkpoint_per_layer: int  # the layer input kept by gradient checkpointing
    shared: int  # RoPE cos/sin and the attention mask, kept once
    embedding: int
    final_norm: int
    head: int  # what the LM head / chunked loss keeps (excluding the logits themselves)
    logits: int  # full-logits loss: log_softmax output (and Gemma's softcap tanh)
    num_layers: int
    hidden_last: int  # bytes of the final hidden state (grad flowing back has this size)
    recompute_peak: int = 0  # widest moment while one block runs forward, its input excluded
    saved_through_attention: int = 0  # a block's saved bytes up to its attention output

    def total(self, checkpointing: bool) -> int:
        layers = self.num_layers * self.checkpoint_per_layer if checkpointing else (
            self.first_layer + (self.num_layers - 1) * self.per_layer
        )
        return layers + self.shared + self.embedding + self.final_norm + self.head + self.logits

    def hook_visible_total(self, checkpointing: bool) -> int:
        """What saved_tensors_hooks can observe.

        bitsandbytes keeps 8-bit matmul inputs in ``ctx.tensors``, out of the hooks' sight, and
        gradient checkpointing holds RoPE tables and masks as closure arguments, not saved tensors.
        """
        if checkpointing:
            layers, shared = self.num_layers * self.checkpoint_per_layer, 0
        else:
            layers = self.first_layer_hook_visible + (self.num_layers - 1) * self.per_layer_hook_visible
            shared = self.shared
        return layers + shared + self.embedding + self.final_norm + self.head + self.logits

    @property
    def layers_no_checkpointing(self) -> int:
        return self.first_layer + (self.num_layers - 1) * self.per_layer


def activation_profile(arch: ModelArch, plan: TracePlan) -> ActivationProfile:
    """Run the symbolic forward once and add the bytes up by region."""
    tokens, b, s, h = plan.tokens, plan.batch, plan.seq_len, arch.hidden_size
    embed_grad = plan.train_base or plan.input_requires_grad
    embedding = Trace(plan)
    if plan.train_base:
        embedding.save(new(tokens, 8, False), "embedding: token ids")
    x = new(tokens * h, plan.residual_bytes, embed_grad)
    # RoPE tables: computed once per forward from position ids of shape (1, length), in the embedding dtype.
    cos = new(s * arch.head_dim, plan.residual_bytes, False, shared=True)
    sin = new(s * arch.head_dim, plan.residual_bytes, False, shared=True)
    mask = new(b * s * s, 1, False, shared=True) if plan.padded and plan.attn != "eager" else None

    first = Trace(plan)
    x1 = decoder_layer(first, arch, x, cos, sin, mask)
    rest = Trace(plan)
    x2 = decoder_layer(rest, arch, x1, cos, sin, mask)
    recompute_peak = rest.peak_live - (x1.storage_bytes if rest.is_saved(x1) else 0)
    shared = {}
    shared.update(first.shared_saved)
    shared.update(rest.shared_saved)

    final = Trace(plan)
    style = "gemma" if arch.block == "gemma2" else "llama"
    normed = rms_norm(final, x2, style, "final norm")

    head = Trace(plan)
    logits_bytes = 0
    n = b * (s - 1)
    if plan.loss == "chunked":
        # TRL's fused LM head keeps the hidden states of the positions it scores (a copy on
        # CUDA, where only labelled positions are gathered), the targets and two per-token vectors.
        if plan.device == "cuda" or b > 1:
            head.save(new(n * h, normed.itemsize, True), "chunked loss: hidden states")
        else:
            head.save(normed, "chunked loss: hidden states")
        if plan.device == "cuda":
            head.save(new(2 * n, 8, False), "chunked loss: gather indices")
        head.save(new(n, 8, False), "chunked loss: targets")
        head.save(new(n, 1, False), "chunked loss: label mask")
        head.save(new(1, 8, False), "chunked loss: token count")
        head.save(new(n, FP32, False), "chunked loss: log-normaliser")
        head.save(new(n, FP32, False), "chunked loss: entropy")
    elif plan.liger:
        # Liger's fused linear cross-entropy computes the gradients during the forward, in chunks of
        # rows, and keeps only the gradient of the hidden states (and of the LM head when trained).
        head.save(new(tokens * h, plan.compute_bytes if plan.autocast else normed.itemsize, True),
                  "Liger fused loss: gradient of the hidden states")
        if plan.train_base:
            head.save(new(arch.vocab_size * h, plan.head_weight_bytes, True), "Liger fused loss: LM head gradient")
    else:
        head_in = autocast_input(head, normed)
        if plan.train_base:
            head.save(head_in, "LM head input")
        vocab_elems = tokens * arch.vocab_size
        logits_bytes = vocab_elems * FP32  # log_softmax output of the fp32-upcast logits
        if arch.final_logit_softcapping:
            logits_bytes += vocab_elems * plan.compute_bytes  # tanh output of the softcap
        head.save(new(tokens, 8, False), "loss: targets")
    ckpt_input = x.storage_bytes
    return ActivationProfile(
        first_layer=first.total,
        per_layer=rest.total,
        per_layer_hook_visible=rest.hook_visible,
        first_layer_hook_visible=first.hook_visible,
        layer_ledger=rest.by_label(),
        checkpoint_per_layer=ckpt_input,
        shared=sum(size for _, size in shared.values()),
        embedding=embedding.total,
        final_norm=final.total,
        head=head.total,
        logits=logits_bytes,
        num_layers=arch.num_layers,
        hidden_last=x2.storage_bytes,
        recompute_peak=recompute_peak,
        saved_through_attention=rest.saved_through_attention,
    )
