"""One run configuration: dataclasses that round-trip through YAML and ``--set`` overrides.

Field names follow the libraries a practitioner already knows: ``lora.*`` are PEFT's
``LoraConfig`` arguments, ``quant.*`` are transformers' ``BitsAndBytesConfig`` arguments,
``train.*`` are TRL's ``SFTConfig`` arguments. Each field carries its help text, so the
UI, the CLI and the YAML all describe the same thing in one place (TRL's style).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError

METHODS = ("lora", "qlora", "dora", "rslora")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "sgd",
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _field(default, help_text: str, **kwargs):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text}, **kwargs)
    return field(default=default, metadata={"help": help_text}, **kwargs)


@dataclass
class ModelSection:
    name_or_path: str = _field("demo", "Base model: 'demo' (the offline tiny model), a local folder, or a hub id.")
    revision: str | None = _field(None, "Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = _field(False, "Run code shipped with the model repository. Off unless you trust it.")
    attn_implementation: str = _field("sdpa", "Attention kernel: sdpa, eager or flash_attention_2.")


@dataclass
class DataSection:
    path: str = _field("demo", "Training data: 'demo', a JSONL/JSON/CSV/Parquet file, or a hub dataset id.")
    format: str = _field("auto", "auto, messages, sharegpt, alpaca, prompt_completion or text.")
    eval_path: str | None = _field(None, "A separate held-out file; when empty, eval_fraction of the data is held out.")
    eval_fraction: float = _field(0.1, "Share of rows held out for evaluation when eval_path is empty (0 disables eval).")
    skip_bad_rows: bool = _field(False, "Skip malformed rows (counted in lineage.json) instead of failing.")


@dataclass
class LoraSection:
    r: int = _field(16, "LoRA rank: the width of the low-rank update.")
    lora_alpha: float = _field(32, "Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    lora_dropout: float = _field(0.05, "Dropout on the LoRA input, 0 <= p < 1.")
    target_modules: Any = _field("all-linear", "Module names to adapt (list), or 'all-linear'.")
    use_dora: bool = _field(False, "DoRA: learn a magnitude vector beside the low-rank direction.")
    use_rslora: bool = _field(False, "rsLoRA: scale by alpha/sqrt(r), stable at high rank.")
    bias: str = _field("none", "Which biases to train: none, all or lora_only.")


@dataclass
class QuantSection:
    load_in_4bit: bool = _field(False, "Load the frozen base in 4 bit with bitsandbytes (QLoRA).")
    load_in_8bit: bool = _field(False, "Load the frozen base in 8 bit with bitsandbytes.")
    bnb_4bit_quant_type: str = _field("nf4", "4-bit data type: nf4 (QLoRA paper) or fp4.")
    bnb_4bit_use_double_quant: bool = _field(True, "Quantize the quantization constants too (saves ~0.37 bit/param).")
    bnb_4bit_compute_dtype: str = _field("bfloat16", "Dtype of matmuls over dequantized weights.")


@dataclass
class TrainSection:
    num_train_epochs: float = _field(1.0, "Epochs over the training rows (ignored when max_steps > 0).")
    max_steps: int = _field(-1, "Total optimizer steps; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = _field(4, "Rows per forward pass.")
    per_device_eval_batch_size: int = _field(8, "Rows per evaluation forward pass.")
    gradient_accumulation_steps: int = _field(1, "Forward passes per optimizer step.")
    learning_rate: float = _field(2e-4, "Peak learning rate.")
    lr_scheduler_type: str = _field("cosine", "Learning rate schedule after warm-up.")
    warmup_steps: float = _field(0.03, "Warm-up: an integer number of steps, or a float in [0, 1) as a ratio.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(0.3, "Gradient clipping norm.")
    optim: str = _field("paged_adamw_32bit", "Optimizer; paged ones fall back to adamw_torch without CUDA.")
    max_length: int = _field(1024, "Tokens per row after the chat template; longer rows are truncated.")
    packing: bool = _field(False, "Pack several short rows into one sequence of max_length.")
    assistant_only_loss: bool = _field(True, "Completion-only loss: train on assistant turns, mask the prompt.")
    gradient_checkpointing: bool = _field(True, "Recompute activations in backward to save memory.")
    bf16: bool = _field(True, "bf16 mixed precision (falls back to float32 without a GPU that supports it).")
    logging_steps: int = _field(5, "Write a metrics line every N optimizer steps.")
    eval_steps: int = _field(50, "Evaluate on the held-out rows every N steps (and at the end).")
    save_steps: int = _field(100, "Save a resumable checkpoint every N steps (and when stopped).")
    save_total_limit: int = _field(2, "Keep at most this many checkpoints.")
    seed: int = _field(42, "Random seed for data order, LoRA init and dropout.")


@dataclass
class RunConfig:
    name: str | None = _field(None, "Run name; a timestamped one is made when empty.")
    description: str = _field("", "Free text shown in the runs table.")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    train: TrainSection = field(default_factory=TrainSection)

    # ------------------------------------------------------------------ derived
    @property
    def method(self) -> str:
        """The method name shown to people, derived from the fields (never stored twice)."""
        if self.quant.load_in_4bit:
            return "qlora"
        if self.lora.use_dora:
            return "dora"
        if self.lora.use_rslora:
            return "rslora"
        return "lora"

    def set_method(self, method: str) -> None:
        """Switch method by setting the fields that define it."""
        if method not in METHODS:
            raise ConfigError("method", f"'{method}' is not one of {', '.join(METHODS)}.")
        self.quant.load_in_4bit = method == "qlora"
        if method == "qlora":
            self.quant.load_in_8bit = False
        self.lora.use_dora = method == "dora"
        self.lora.use_rslora = method == "rslora"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "config") -> "RunConfig":
        config = cls()
        for key, value in (data or {}).items():
            config.set(key, value, source=source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "no such preset or config file.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}", f"not valid YAML ({getattr(error, 'problem', error)}).") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(str(path), "the top level must be a mapping of sections (model, data, lora, ...).")
        config = cls.from_dict(data, source=str(path))
        config.apply_overrides(overrides or [])
        return config

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``section.field=value`` strings; values are parsed as YAML scalars/lists."""
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "an override must look like section.field=value, e.g. train.max_steps=50.")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
            self.set_path(key.strip(), value)

    def set_path(self, dotted: str, value: Any) -> None:
        parts = dotted.split(".")
        if len(parts) == 1:
            self.set(parts[0], value)
        elif len(parts) == 2:
            self.set(parts[0], {parts[1]: value})
        else:
            raise ConfigError(dotted, "use section.field (two parts), e.g. lora.r=8.")

    def set(self, key: str, value: Any, source: str = "config") -> None:
        """Set a top-level key; section values are merged field by field."""
        top_fields = {f.name: f for f in dataclasses.fields(self)}
        if key == "method":  # accepted as a convenience, stored as the fields it implies
            self.set_method(str(value))
            return
        if key not in top_fields:
            raise ConfigError(key, f"unknown key in {source}{_suggest(key, list(top_fields) + ['method'])}.")
        current = getattr(self, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a mapping of fields, got {value!r}.")
            section_fields = {f.name for f in dataclasses.fields(current)}
            for name, item in value.items():
                if name not in section_fields:
                    raise ConfigError(f"{key}.{name}", f"unknown field in {source}{_suggest(name, section_fields)}.")
                setattr(current, name, _coerce(f"{key}.{name}", getattr(current, name), item, type(current), name))
        else:
            setattr(self, key, value)

    # ------------------------------------------------------------------ validation
    def errors(self) -> list[ConfigError]:
        """Every problem found without loading the model, each naming field, value and range."""
        problems: list[ConfigError] = []

        def check(ok: bool, name: str, message: str):
            if not ok:
                problems.append(ConfigError(name, message))

        lora, train, quant, data = self.lora, self.train, self.quant, self.data
        check(_is_int(lora.r) and lora.r > 0, "lora.r", f"rank must be a positive integer, got {lora.r!r}.")
        check(_is_num(lora.lora_alpha) and lora.lora_alpha > 0, "lora.lora_alpha",
              f"must be a number > 0, got {lora.lora_alpha!r}.")
        check(_is_num(lora.lora_dropout) and 0 <= lora.lora_dropout < 1, "lora.lora_dropout",
              f"must satisfy 0 <= dropout < 1, got {lora.lora_dropout!r}.")
        check(lora.bias in ("none", "all", "lora_only"), "lora.bias", f"must be none, all or lora_only, got {lora.bias!r}.")
        targets = lora.target_modules
        check(targets == "all-linear" or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)),
              "lora.target_modules", f"must be 'all-linear' or a non-empty list of module names, got {targets!r}.")
        check(not (lora.use_dora and quant.load_in_8bit), "lora.use_dora", "DoRA is not supported on an 8-bit base.")
        check(_is_num(train.learning_rate) and train.learning_rate > 0, "train.learning_rate",
              f"must be > 0, got {train.learning_rate!r}.")
        check(_is_num(train.learning_rate) and train.learning_rate < 1, "train.learning_rate",
              f"must be below 1 (typical LoRA values are 1e-5 to 1e-3), got {train.learning_rate!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(train, name)
            check(_is_int(value) and value > 0, f"train.{name}", f"must be a positive integer, got {value!r}.")
        check(_is_int(train.max_length) and 8 <= train.max_length <= 1_048_576, "train.max_length",
              f"must be an integer from 8 to 1048576, got {train.max_length!r}.")
        check(_is_int(train.max_steps) and (train.max_steps == -1 or train.max_steps > 0), "train.max_steps",
              f"must be -1 (use epochs) or a positive integer, got {train.max_steps!r}.")
        check(_is_num(train.num_train_epochs) and train.num_train_epochs > 0, "train.num_train_epochs",
              f"must be > 0, got {train.num_train_epochs!r}.")
        check(_is_num(train.warmup_steps) and train.warmup_steps >= 0 and (
            _is_int(train.warmup_steps) or train.warmup_steps < 1), "train.warmup_steps",
              f"must be an integer >= 0 or a ratio in [0, 1), got {train.warmup_steps!r}.")
        check(_is_num(train.max_grad_norm) and train.max_grad_norm > 0, "train.max_grad_norm",
              f"must be > 0, got {train.max_grad_norm!r}.")
        check(_is_num(train.weight_decay) and train.weight_decay >= 0, "train.weight_decay",
              f"must be >= 0, got {train.weight_decay!r}.")
        check(train.lr_scheduler_type in SCHEDULERS, "train.lr_scheduler_type",
              f"must be one of {', '.join(SCHEDULERS)}, got {train.lr_scheduler_type!r}{_suggest(str(train.lr_scheduler_type), SCHEDULERS)}.")
        check(train.optim in OPTIMIZERS, "train.optim",
              f"must be one of {', '.join(OPTIMIZERS)}, got {train.optim!r}{_suggest(str(train.optim), OPTIMIZERS)}.")
        check(_is_int(train.seed) and train.seed >= 0, "train.seed", f"must be an integer >= 0, got {train.seed!r}.")
        check(_is_num(data.eval_fraction) and 0 <= data.eval_fraction < 1, "data.eval_fraction",
              f"must satisfy 0 <= fraction < 1, got {data.eval_fraction!r}.")
        check(data.format in ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"), "data.format",
              f"must be auto, messages, sharegpt, alpaca, prompt_completion or text, got {data.format!r}.")
        check(not (data.format == "text" and train.assistant_only_loss), "train.assistant_only_loss",
              "plain-text data has no assistant turns: set it to false for continued pre-training.")
        check(isinstance(self.model.name_or_path, str) and self.model.name_or_path.strip() != "", "model.name_or_path",
              "must name a base model ('demo', a local folder or a hub id).")
        check(self.model.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "model.attn_implementation",
              f"must be sdpa, eager or flash_attention_2, got {self.model.attn_implementation!r}.")
        check(not (quant.load_in_4bit and quant.load_in_8bit), "quant.load_in_8bit",
              "choose 4 bit or 8 bit, not both.")
        check(quant.bnb_4bit_quant_type in ("nf4", "fp4"), "quant.bnb_4bit_quant_type",
              f"must be nf4 or fp4, got {quant.bnb_4bit_quant_type!r}.")
        check(quant.bnb_4bit_compute_dtype in COMPUTE_DTYPES, "quant.bnb_4bit_compute_dtype",
              f"must be one of {', '.join(COMPUTE_DTYPES)}, got {quant.bnb_4bit_compute_dtype!r}.")
        if quant.load_in_4bit or quant.load_in_8bit:
            import importlib.util

            check(importlib.util.find_spec("bitsandbytes") is not None, "quant.load_in_4bit",
                  "4-bit and 8-bit loading require the bitsandbytes package: pip install bitsandbytes.")
        if self.name is not None:
            check(isinstance(self.name, str) and _safe_name(self.name), "name",
                  f"may contain letters, digits, '-', '_' and '.', not start with '.', got {self.name!r}.")
        return problems

    def validate(self) -> "RunConfig":
        problems = self.errors()
        if problems:
            raise ConfigError(problems[0].field, str(problems[0]).split(": ", 1)[1]) if len(problems) == 1 else \
                ConfigError("config", "; ".join(str(p) for p in problems))
        return self


def _safe_name(name: str) -> bool:
    from engine.names import name_problem

    return name_problem(name) is None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Names people type from other tools, mapped to ours for the "did you mean" hint.
SYNONYMS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
            "batch_size": "per_device_train_batch_size", "max_seq_length": "max_length", "epochs": "num_train_epochs",
            "scheduler": "lr_scheduler_type", "optimizer": "optim", "warmup_ratio": "warmup_steps"}


def _suggest(word: str, options) -> str:
    options = list(options)
    if SYNONYMS.get(word) in options:
        return f" (did you mean '{SYNONYMS[word]}'?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(path: str, current: Any, value: Any, section_type: type, name: str) -> Any:
    """Accept what YAML and --set give; turn int-looking floats for float fields; keep the rest for validation."""
    default = next(f for f in dataclasses.fields(section_type) if f.name == name).default
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        try:  # YAML reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            return value
        if isinstance(default, int) and value.is_integer():
            return int(value)
    if isinstance(default, float) and _is_int(value) and name not in ("warmup_steps",):
        return float(value)
    if name == "target_modules" and isinstance(value, str) and value != "all-linear":
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def field_help() -> dict[str, str]:
    """``section.field`` -> help text, for the UI and the CLI's --help."""
    helps = {}
    for section in dataclasses.fields(RunConfig):
        default = RunConfig().__getattribute__(section.name)
        if dataclasses.is_dataclass(default):
            for f in dataclasses.fields(default):
                helps[f"{section.name}.{f.name}"] = f.metadata.get("help", "")
        else:
            helps[section.name] = section.metadata.get("help", "")
    return helps


PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset by name (``demo-lora``) or a YAML path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    return RunConfig.from_yaml(path, overrides)
