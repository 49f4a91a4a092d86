"""Model architectures for the memory calculator: what a decoder is made of, counted exactly.

The calculator needs the dimensions of a model, never its weights. They come from a
Hugging Face ``config.json`` (a local folder, a hub id when online, or one of the
catalog files in ``presets/models/`` which are copies of the hub configs of popular
bases). From those numbers this module derives the list of linear layers in a decoder
block, the parameter count, and which layers a LoRA ``target_modules`` choice hits. The
counts match ``sum(p.numel())`` of a meta-device model wrapped by PEFT exactly (the test
suite checks it), so every byte figure built on them starts from the right place.

Pure Python: no torch import, so the Memory tab and the command line stay quick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine import PRESETS_DIR
from engine.demo import DEMO_MODEL_NAME
from engine.errors import ConfigError, ModelNotFoundError
from engine.hub import looks_like_hub_id, resolve_model, resolve_source

CATALOG_DIR = PRESETS_DIR / "models"

# The numbers nothing can be estimated without, with the config.json key that carries each.
REQUIRED_FIELDS = {
    "hidden_size": "hidden size",
    "num_hidden_layers": "number of layers",
    "num_attention_heads": "attention heads",
    "num_key_value_heads": "KV heads",
    "intermediate_size": "intermediate (MLP) size",
    "vocab_size": "vocabulary size",
}
# Alternative spellings used by some configs (GPT-style names).
_ALIASES = {
    "hidden_size": ("n_embd", "d_model"),
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head",),
    "intermediate_size": ("ffn_dim", "n_inner"),
}

# Block layouts we model op by op. Anything else with the required numbers is treated as
# a Llama-style block (pre-norm, RoPE, gated MLP), and the estimate says so.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "smollm", "smollm2"}
KNOWN_TYPES = LLAMA_LIKE | {"gemma2", "phi3"}


class ArchitectureIncompleteError(ConfigError):
    """A config lacks numbers the estimator needs; the message lists them."""

    def __init__(self, source: str, missing: list[str]):
        self.missing = missing
        names = ", ".join(f"{REQUIRED_FIELDS[key]} ({key})" for key in missing)
        super().__init__(
            "model",
            f"the configuration from {source} does not give {names}. The memory estimator needs the hidden size, "
            "the number of layers, attention heads, KV heads, the intermediate size and the vocabulary size; "
            "type them in by hand (Memory tab: 'custom dimensions', command line: --dims).",
        )


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear in a decoder block (``name`` as it appears in the module path)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelArch:
    """The dimensions of a decoder-only language model, as the calculator sees it."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    source: str = ""
    hub_id: str = ""
    config: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- block layout
    @property
    def block(self) -> str:
        """Which op-by-op layout models this architecture: llama, gemma2 or phi3."""
        if self.model_type in ("gemma2", "phi3"):
            return self.model_type
        return "llama"

    @property
    def is_known_layout(self) -> bool:
        return self.model_type in KNOWN_TYPES

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.block == "gemma2" else 2

    def linear_layers(self) -> list[LinearLayer]:
        """The linear layers of one decoder block, in forward order."""
        h, i = self.hidden_size, self.intermediate_size
        if self.block == "phi3":
            return [
                LinearLayer("qkv_proj", h, self.q_dim + 2 * self.kv_dim),
                LinearLayer("o_proj", self.q_dim, h),
                LinearLayer("gate_up_proj", h, 2 * i),
                LinearLayer("down_proj", i, h),
            ]
        return [
            LinearLayer("q_proj", h, self.q_dim, self.qkv_bias),
            LinearLayer("k_proj", h, self.kv_dim, self.qkv_bias),
            LinearLayer("v_proj", h, self.kv_dim, self.qkv_bias),
            LinearLayer("o_proj", self.q_dim, h, self.o_bias),
            LinearLayer("gate_proj", h, i, self.mlp_bias),
            LinearLayer("up_proj", h, i, self.mlp_bias),
            LinearLayer("down_proj", i, h, self.mlp_bias),
        ]

    def linear_by_name(self) -> dict[str, LinearLayer]:
        return {layer.name: layer for layer in self.linear_layers()}

    # ----------------------------------------------------------------- parameter counts
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters of a separate output projection (0 when tied to the embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (self.num_layers * self.norms_per_layer + 1) * self.hidden_size

    @property
    def linear_weight_params(self) -> int:
        """Weights of all block linears (what bitsandbytes quantizes)."""
        return self.num_layers * sum(layer.weight_numel for layer in self.linear_layers())

    @property
    def linear_bias_params(self) -> int:
        return self.num_layers * sum(layer.out_features for layer in self.linear_layers() if layer.bias)

    @property
    def total_params(self) -> int:
        return (
            self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + self.linear_weight_params
            + self.linear_bias_params
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "total_params": self.total_params,
            "source": self.source,
        }


# --------------------------------------------------------------------- LoRA targets
def resolve_targets(arch: ModelArch, targets: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Names of the block linears that get a LoRA adapter, following PEFT's matching rules.

    ``"all-linear"`` means every linear layer except the output projection (PEFT excludes
    ``lm_head``); a list matches a module when its name equals an entry or ends with
    ``"." + entry``; any other string is a regular expression matched against the full
    module path (``model.layers.0.self_attn.q_proj``). ``lm_head`` may be listed
    explicitly and is reported separately by :func:`lm_head_targeted`.
    """
    layers = [layer.name for layer in arch.linear_layers()]
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return layers
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ConfigError("lora.target_modules", f"'{targets}' is not a valid regular expression ({exc}).") from exc
        chosen = [name for name in layers if pattern.fullmatch(_module_path(arch, name))]
        if not chosen and not lm_head_targeted(arch, targets):
            raise ConfigError(
                "lora.target_modules",
                f"the pattern '{targets}' matches no linear layer of {arch.name}; its layers are {', '.join(layers)}.",
            )
        return chosen
    wanted = [str(entry).strip() for entry in targets if str(entry).strip()]
    unknown = [
        entry for entry in wanted if entry != "lm_head" and not any(_suffix_match(name, entry, arch) for name in layers)
    ]
    if unknown:
        raise ConfigError(
            "lora.target_modules",
            f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear layer of {arch.name}; "
            f"choose from {', '.join(layers)} (or 'all-linear').",
        )
    return [name for name in layers if any(_suffix_match(name, entry, arch) for entry in wanted)]


def lm_head_targeted(arch: ModelArch, targets) -> bool:
    """Whether the target choice puts an adapter on the output projection."""
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return False
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, "lm_head"))
    return "lm_head" in [str(entry).strip() for entry in targets]


def _module_path(arch: ModelArch, name: str) -> str:
    parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj") else "mlp"
    return f"model.layers.0.{parent}.{name}"


def _suffix_match(name: str, entry: str, arch: ModelArch) -> bool:
    path = _module_path(arch, name)
    return entry == name or path == entry or path.endswith("." + entry)


def lora_params_per_layer(arch: ModelArch, targets: list[str], rank: int, dora: bool) -> int:
    """Adapter parameters in one block: r*(in+out) per targeted linear, plus DoRA's magnitude."""
    by_name = arch.linear_by_name()
    total = 0
    for name in targets:
        layer = by_name[name]
        total += rank * (layer.in_features + layer.out_features)
        if dora:
            total += layer.out_features
    return total


def lora_param_tensors(arch: ModelArch, targets: list[str], rank: int, dora: bool, lm_head: bool) -> list[int]:
    """Element counts of every adapter tensor (the optimizer treats each one separately)."""
    by_name = arch.linear_by_name()
    per_layer: list[int] = []
    for name in targets:
        layer = by_name[name]
        per_layer += [rank * layer.in_features, rank * layer.out_features]
        if dora:
            per_layer.append(layer.out_features)
    tensors = per_layer * arch.num_layers
    if lm_head:
        tensors += [rank * arch.hidden_size, rank * arch.vocab_size]
        if dora:
            tensors.append(arch.vocab_size)
    return tensors


# --------------------------------------------------------------------- loading
def arch_from_config(config: dict, name: str = "", source: str = "") -> ModelArch:
    """Build a ModelArch from a config.json dictionary (text config of multimodal models too)."""
    config = dict(config)
    for nested in ("text_config", "llm_config"):
        if isinstance(config.get(nested), dict) and "hidden_size" not in config:
            config = {**config[nested], "_parent_model_type": config.get("model_type")}
    values: dict[str, int] = {}
    missing = []
    for key in REQUIRED_FIELDS:
        value = config.get(key)
        if value is None:
            for alias in _ALIASES.get(key, ()):
                if config.get(alias) is not None:
                    value = config[alias]
                    break
        if value is None and key == "num_key_value_heads" and config.get("num_attention_heads"):
            # Configs without the key use plain multi-head attention (KV heads == heads).
            value = config["num_attention_heads"]
        if value is None:
            missing.append(key)
        else:
            values[key] = int(value)
    if missing:
        raise ArchitectureIncompleteError(source or name or "the given config", missing)
    model_type = str(config.get("model_type") or "unknown").lower()
    heads = values["num_attention_heads"]
    head_dim = int(config.get("head_dim") or values["hidden_size"] // heads)
    meta = config.get("_catalog") or {}
    qkv_bias = bool(config.get("attention_bias", False))
    o_bias = qkv_bias
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False  # Qwen2 hard-codes biases on q, k, v only
    return ModelArch(
        name=name or meta.get("id") or config.get("_name_or_path") or model_type,
        model_type=model_type,
        hidden_size=values["hidden_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=values["num_key_value_heads"],
        head_dim=head_dim,
        intermediate_size=values["intermediate_size"],
        vocab_size=values["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in ("gemma2",))),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        hidden_act=str(config.get("hidden_activation") or config.get("hidden_act") or "silu"),
        attn_logit_softcapping=config.get("attn_logit_softcapping"),
        final_logit_softcapping=config.get("final_logit_softcapping"),
        source=source,
        hub_id=meta.get("hub_id", ""),
        config={k: v for k, v in config.items() if k != "_catalog"},
    )


def arch_from_numbers(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    name: str = "custom",
) -> ModelArch:
    """A Llama-style architecture from numbers a person typed in."""
    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
    }
    if head_dim:
        config["head_dim"] = head_dim
    for key, value in config.items():
        if key in REQUIRED_FIELDS and (not isinstance(value, int) or value <= 0):
            raise ConfigError(key, f"must be a positive whole number, got {value!r}.")
    if num_heads % num_kv_heads:
        raise ConfigError("num_key_value_heads", f"{num_heads} attention heads are not divisible by {num_kv_heads}.")
    return arch_from_config(config, name=name, source="typed in")


def catalog_ids() -> list[str]:
    """Ids of the built-in architectures (file names in presets/models/)."""
    return sorted(path.stem for path in CATALOG_DIR.glob("*.json"))


def catalog_entry(model_id: str) -> dict:
    path = CATALOG_DIR / f"{model_id}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def catalog_id_for(name: str) -> str | None:
    """Catalog id for a name: the id itself, any case, or the hub id stored in the entry; None otherwise."""
    return _catalog_lookup(name)


def _catalog_lookup(name: str) -> str | None:
    """Catalog id for a name: the id itself, any case, or the hub id stored in the entry."""
    wanted = name.strip().lower()
    ids = catalog_ids()
    if wanted in ids:
        return wanted
    for model_id in ids:
        hub_id = (catalog_entry(model_id).get("_catalog") or {}).get("hub_id", "")
        if hub_id.lower() == wanted or hub_id.split("/")[-1].lower() == wanted:
            return model_id
    return None


def load_arch(name_or_folder: str) -> ModelArch:
    """The architecture behind a catalog id, a local folder, "demo", or a hub id (online only)."""
    name = (name_or_folder or "").strip()
    if not name:
        raise ModelNotFoundError("No model was given: pick a catalog model, a local folder or a hub id.")
    if name == DEMO_MODEL_NAME:
        return _arch_from_folder(Path(resolve_model(name)), name=name)
    catalog_id = _catalog_lookup(name)
    path = Path(name).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        return _arch_from_folder(folder, name=path.name)
    if catalog_id:
        return arch_from_config(catalog_entry(catalog_id), name=catalog_id,
                                source=f"catalog: presets/models/{catalog_id}.json")
    if looks_like_hub_id(name):
        resolve_source(name, what="base model")  # raises a sentence when offline and not cached
        try:
            from huggingface_hub import hf_hub_download

            config_path = hf_hub_download(name, "config.json")
        except Exception as exc:  # network, gated repo, missing file: say which
            raise ModelNotFoundError(f"Could not read config.json of '{name}' from the hub: {exc}") from exc
        return arch_from_config(json.loads(Path(config_path).read_text(encoding="utf-8")), name=name,
                                source=f"hub: {name}")
    raise ModelNotFoundError(
        f"'{name}' is not a catalog model, a local folder or a hub id. Catalog models: {', '.join(catalog_ids())}."
    )


def _arch_from_folder(folder: Path, name: str) -> ModelArch:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; point at a Hugging Face model folder.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError("model", f"{config_path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    return arch_from_config(config, name=name, source=str(config_path))
