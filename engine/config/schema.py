"""One run configuration: typed sections that round-trip through YAML and ``--set`` overrides.

Field names follow the libraries a practitioner already knows: ``lora.*`` are PEFT's
``LoraConfig`` arguments (plus TRL's ``use_peft``), ``quant.*`` are transformers'
``BitsAndBytesConfig`` arguments, ``train.*`` are TRL's ``SFTConfig`` arguments. Each field
carries, in its metadata, its help text, its label, its type and its allowed values or
range; validation, the Train form, the CLI's help and the error sentences all read that one
place (TRL's style: the option is documented where it is defined).

Why dataclasses and not pydantic: the form needs *every* problem at once, each as our own
sentence naming field, value and allowed range, and the YAML must stay a plain mapping.
Dataclass metadata gives that with no extra layer between the field and its rule; the few
rules that span fields live in ``RunConfig._cross_field_errors``. ``errors()`` is called
explicitly (not from ``__post_init__``) because a config is built field by field from YAML,
``--set`` and the form, and is only complete at the end.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config.choices import optimizer_names, packing_strategies, scheduler_names
from engine.config.trackers import REPORT_TO_CHOICES
from engine.data.formats import FORMAT_CHOICES
from engine.errors import ConfigError
from engine.evals.metrics import METRICS, metric_choices, option_problems
from engine.names import name_problem

METHODS = ("lora", "qlora", "lora8bit", "dora", "rslora", "full")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = "all-linear"
EARLY_STOPPING_METRICS = ("eval_loss", "task_score")
EARLY_STOPPING_DIRECTIONS = ("auto", "lower", "higher")
STRATEGIES = ("none", "ddp", "fsdp")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
FSDP_WRAP = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")


# ----------------------------------------------------------------------------- field specs
@dataclass(frozen=True)
class FieldSpec:
    """What a field accepts, read from its metadata: the one source for validation and forms.

    ``kind``: bool, int, float, number (an int or a ratio), str, modules (a list of names or
    'all-linear'), list (several of ``choices``; 'none' alone means an empty list) or
    mapping. ``rule`` is the sentence shown when a value is below range or
    of the wrong type ("rank must be a positive integer"); values above ``le`` get their own
    sentence naming the limit.
    """

    path: str
    kind: str
    default: Any
    help: str
    label: str
    rule: str = ""
    optional: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()  # values allowed outside the range, e.g. max_steps = -1
    choices_from: Callable[[], tuple] | tuple | None = None

    @property
    def choices(self) -> tuple | None:
        source = self.choices_from
        return source() if callable(source) else source

    @property
    def name(self) -> str:
        return self.path.split(".")[-1]

    def coerce(self, value: Any) -> Any:
        """Accept what YAML, ``--set`` and forms give; anything still wrong is left for ``problem``."""
        if isinstance(value, str):
            value = value.strip()
            if value == "" and self.optional:
                return None
        if self.kind == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if self.kind in ("int", "float", "number") and isinstance(value, str):
            try:  # YAML reads "1e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                return value
        if self.kind in ("int", "number") and isinstance(value, float) and value.is_integer() and math.isfinite(value):
            if self.kind == "int" or value >= 1:  # a number of 1 or more is a count of steps, below 1 a ratio
                return int(value)
        if self.kind == "float" and _is_int(value):
            return float(value)
        if self.kind == "modules" and isinstance(value, str) and value != ALL_LINEAR:
            return [part.strip() for part in value.split(",") if part.strip()]
        if self.kind == "modules" and isinstance(value, (list, tuple)):
            return list(value)
        if self.kind == "list":
            if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
                return []
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if isinstance(value, (list, tuple)):
                items = [item.strip() if isinstance(item, str) else item for item in value]
                return [] if items == ["none"] else items
        return value

    def problem(self, value: Any) -> str | None:
        """The sentence for a bad value (without the field name), or None."""
        got = f", got {value!r}."
        if value is None:
            return None if self.optional else f"{self.rule or 'is required'}{got}"
        if value in self.also and not isinstance(value, bool):
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false{got}"
        if self.kind == "str":
            if not isinstance(value, str) or (not self.optional and not value.strip()):
                return f"{self.rule or 'must be text'}{got}"
        if self.kind == "mapping":
            return None if isinstance(value, dict) else f"must be a mapping of names to values{got}"
        if self.kind == "modules":
            ok = value == ALL_LINEAR or (isinstance(value, list) and value
                                         and all(isinstance(t, str) and t for t in value))
            return None if ok else f"must be 'all-linear' or a non-empty list of module names{got}"
        if self.kind == "list":
            return self._list_problem(value)
        if self.kind in ("int", "float", "number"):
            numeric = _is_int(value) if self.kind == "int" else _is_num(value)
            if not numeric or not math.isfinite(value) or (self.ge is not None and value < self.ge) \
                    or (self.gt is not None and value <= self.gt):
                return f"{self.rule}{got}"
            if self.kind == "number" and isinstance(value, float) and value >= 1:
                return f"{self.rule}{got}"  # neither a whole number of steps nor a ratio below 1
            if (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt):
                if self.lt is not None and self.le is None:
                    return f"{self.rule}{got}"
                return f"must be at most {int(self.le) if float(self.le).is_integer() else self.le}{got}"
        choices = self.choices
        if choices is not None and value not in choices:
            listed = ", ".join(map(str, choices[:10])) + (f" … ({len(choices)} in all)" if len(choices) > 10 else "")
            return f"must be one of {listed}, got {value!r}{suggest(str(value), [str(c) for c in choices])}."

        return None

    def _list_problem(self, value: Any) -> str | None:
        """A list kind: a list of distinct choices; 'none' only alone (it means the empty list)."""
        choices = tuple(self.choices or ())
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return f"must be a list of names from {', '.join(choices)}, got {value!r}."
        for item in value:
            if item not in choices:
                return f"'{item}' is not one of {', '.join(choices)}{suggest(item, choices)}, got {value!r}."
        if "none" in value:
            return f"'none' cannot be combined with other names, got {value!r}."
        if len(set(value)) != len(value):
            return f"names a value twice, got {value!r}."
        return None


def spec(default, help_text: str, label: str = "", *, kind: str | None = None, **rules):
    """A dataclass field whose metadata is its ``FieldSpec`` (path filled in by ``field_specs``)."""
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "str", dict: "mapping", list: "modules"}.get(
            type(default), "str")
    meta = {"help": help_text, "label": label, "kind": kind, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    name_or_path: str = spec("demo", "Base model: 'demo' (the offline tiny model), a local folder, or a hub id.",
                             "Base model", rule="must name a base model ('demo', a local folder or a hub id)")
    revision: str | None = spec(None, "Hub revision (branch, tag or commit) of the base model.", "Revision",
                                kind="str", optional=True)
    trust_remote_code: bool = spec(False, "Run code shipped with the model repository. Off unless you trust it.",
                                   "Trust remote code")
    attn_implementation: str = spec("sdpa", "Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 (needs the "
                                    "flash-attn package and an Ampere or newer GPU; falls back to sdpa otherwise).",
                                    "Attention", choices_from=ATTENTION)


@dataclass
class DataSection:
    path: str = spec("demo", "Training data: 'demo', a JSONL/JSON/CSV/Parquet file, or a hub dataset id.", "Dataset",
                     rule="must name a dataset ('demo', a file or a hub id)")
    format: str = spec("auto", f"{', '.join(FORMAT_CHOICES)}.", "Dataset format", choices_from=FORMAT_CHOICES)
    eval_path: str | None = spec(None, "A separate held-out file; when empty, eval_fraction of the data is held out.",
                                 "Eval file (optional)", kind="str", optional=True)
    eval_fraction: float = spec(0.1, "Share of rows held out for evaluation when eval_path is empty (0 disables eval).",
                                "Eval fraction", rule="must satisfy 0 <= fraction < 1", ge=0, lt=1)
    skip_bad_rows: bool = spec(False, "Skip malformed rows (counted in lineage.json) instead of failing.",
                               "Skip bad rows")


@dataclass
class LoraSection:
    use_peft: bool = spec(True, "Train LoRA adapters (TRL's use_peft); false fine-tunes every weight (full).",
                          "Use PEFT (LoRA)")
    r: int = spec(16, "LoRA rank: the width of the low-rank update.", "Rank r",
                  rule="rank must be a positive integer", ge=1, le=4096)
    lora_alpha: float = spec(32.0, "Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).",
                             "Alpha", rule="must be a number > 0", gt=0, le=1e6)
    lora_dropout: float = spec(0.05, "Dropout on the LoRA input, 0 <= p < 1.", "Dropout",
                               rule="must satisfy 0 <= dropout < 1", ge=0, lt=1)
    target_modules: Any = spec(ALL_LINEAR, "Module names to adapt (comma-separated), or 'all-linear'.",
                               "Target modules", kind="modules")
    use_dora: bool = spec(False, "DoRA: learn a magnitude vector beside the low-rank direction.", "DoRA")
    use_rslora: bool = spec(False, "rsLoRA: scale by alpha/sqrt(r), stable at high rank.", "rsLoRA")
    bias: str = spec("none", "Which biases to train: none, all or lora_only.", "Bias",
                     choices_from=("none", "all", "lora_only"))


@dataclass
class QuantSection:
    load_in_4bit: bool = spec(False, "Load the frozen base in 4 bit with bitsandbytes (QLoRA).", "4-bit base")
    load_in_8bit: bool = spec(False, "Load the frozen base in 8 bit with bitsandbytes.", "8-bit base")
    bnb_4bit_quant_type: str = spec("nf4", "4-bit data type: nf4 (QLoRA paper) or fp4.", "4-bit type",
                                    choices_from=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = spec(True, "Quantize the quantization constants too (saves ~0.37 bit/param).",
                                           "Double quantization")
    bnb_4bit_compute_dtype: str = spec("bfloat16", "Dtype of matmuls over dequantized weights.", "4-bit compute dtype",
                                       choices_from=COMPUTE_DTYPES)
    bnb_4bit_quant_storage: str = spec("uint8", "Dtype the packed 4-bit weights are stored in. FSDP flattens every "
                                       "weight of a wrapped block into one tensor, so QLoRA + FSDP needs it equal to "
                                       "the compute dtype (e.g. bfloat16); uint8 otherwise.", "4-bit storage dtype",
                                       choices_from=QUANT_STORAGE)


@dataclass
class TrainSection:
    num_train_epochs: float = spec(1.0, "Epochs over the training rows (ignored when max_steps > 0).", "Epochs",
                                   rule="must be > 0", gt=0, le=10_000)
    max_steps: int = spec(-1, "Total optimizer steps; -1 means use num_train_epochs.", "Max steps",
                          rule="must be -1 (use epochs) or a positive integer", ge=1, le=10**9, also=(-1,))
    per_device_train_batch_size: int = spec(4, "Rows per forward pass.", "Batch size",
                                            rule="must be a positive integer", ge=1, le=65_536)
    per_device_eval_batch_size: int = spec(8, "Rows per evaluation forward pass.", "Eval batch size",
                                           rule="must be a positive integer", ge=1, le=65_536)
    gradient_accumulation_steps: int = spec(1, "Forward passes per optimizer step.", "Gradient accumulation",
                                            rule="must be a positive integer", ge=1, le=65_536)
    learning_rate: float = spec(2e-4, "Peak learning rate.", "Learning rate",
                                rule="must be > 0 and below 1 (typical LoRA values are 1e-5 to 1e-3)", gt=0, lt=1)
    lr_scheduler_type: str = spec("cosine", "Learning rate schedule after warm-up (transformers' SchedulerType).",
                                  "Schedule", choices_from=scheduler_names)
    lr_scheduler_kwargs: dict = spec({}, "Extra schedule arguments, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.",
                                     "Schedule arguments")
    warmup_steps: float = spec(0.03, "Warm-up: an integer number of steps, or a float in [0, 1) as a ratio.",
                               "Warm-up", kind="number", rule="must be an integer >= 0 or a ratio in [0, 1)",
                               ge=0, le=10**9)
    weight_decay: float = spec(0.0, "AdamW weight decay.", "Weight decay", rule="must be >= 0", ge=0, le=100)
    max_grad_norm: float = spec(0.3, "Gradient clipping norm.", "Max grad norm", rule="must be > 0", gt=0, le=1e6)
    optim: str = spec("paged_adamw_32bit", "Optimizer (transformers' OptimizerNames); paged and 8-bit ones fall back "
                      "to adamw_torch without CUDA.", "Optimizer", choices_from=optimizer_names)
    max_length: int = spec(1024, "Tokens per row after the chat template; longer rows are truncated.",
                           "Max length (tokens)", rule="must be an integer from 8 to 1048576", ge=8, le=1_048_576)
    packing: bool = spec(False, "Pack several short rows into one sequence of max_length (TRL's packing); with "
                         "bfd each row keeps its own positions and attends only to itself.", "Packing")
    packing_strategy: str = spec("bfd", "How rows are packed (TRL's packing_strategy): bfd (best-fit decreasing, "
                                 "rows longer than max_length are truncated), bfd_split (overflow becomes new rows) "
                                 "or wrapped (cuts rows mid-sequence; not padding-free).", "Packing strategy",
                                 choices_from=packing_strategies)
    padding_free: bool = spec(False, "Padding-free batches (TRL's padding_free): the rows of a batch are flattened "
                              "into one sequence with per-row position ids, so no step computes on padding. "
                              "flash_attention_2 runs it natively; sdpa and eager get a block-diagonal mask.",
                              "Padding-free")
    use_liger_kernel: bool = spec(False, "Liger Triton kernels for RMSNorm, RoPE and SwiGLU (transformers' "
                                  "use_liger_kernel; TRL keeps its own chunked loss). Needs CUDA, triton and "
                                  "liger-kernel; off otherwise.", "Liger kernels")
    assistant_only_loss: bool = spec(True, "Completion-only loss: train on assistant turns, mask the prompt.",
                                     "Assistant-only loss")
    gradient_checkpointing: bool = spec(True, "Recompute activations in backward to save memory.",
                                        "Gradient checkpointing")
    bf16: bool = spec(True, "bf16 mixed precision (falls back to float32 without a GPU that supports it).", "bf16")
    logging_steps: int = spec(5, "Write a metrics line every N optimizer steps.", "Log every N steps",
                              rule="must be a positive integer", ge=1, le=10**9)
    eval_steps: int = spec(50, "Evaluate on the held-out rows every N steps (and at the end).", "Eval every N steps",
                           rule="must be a positive integer", ge=1, le=10**9)
    save_steps: int = spec(100, "Save a resumable checkpoint every N steps (and when stopped).", "Save every N steps",
                           rule="must be a positive integer", ge=1, le=10**9)
    save_total_limit: int = spec(2, "Keep at most this many checkpoints.", "Checkpoints kept",
                                 rule="must be a positive integer", ge=1, le=10_000)
    early_stopping_patience: int = spec(0, "Early stopping (transformers' EarlyStoppingCallback): end the run when "
                                        "the metric below has not improved for this many evaluations, and keep the "
                                        "best checkpoint's adapter (load_best_model_at_end); 0 turns it off. The "
                                        "overfitting alarm watches the same metric either way.",
                                        "Early stopping patience",
                                        rule="must be an integer >= 0 (0: off)", ge=0, le=10_000)
    early_stopping_metric: str = spec("eval_loss", "What early stopping and the overfitting alarm watch: eval_loss, "
                                      "or task_score (the eval.metric score at each evaluation).",
                                      "Early stopping metric",
                                      choices_from=EARLY_STOPPING_METRICS)
    early_stopping_direction: str = spec("auto", "Which way is better for that metric: auto (lower eval loss, higher "
                                         "task score), lower or higher.", "Early stopping direction",
                                         choices_from=EARLY_STOPPING_DIRECTIONS)
    seed: int = spec(42, "Random seed for data order, LoRA init and dropout.", "Seed",
                     rule="must be an integer >= 0", ge=0, le=2**32 - 1)
    memory_probe: bool = spec(False, "Measurement run: record the memory of every training phase (weights loaded, "
                              "forward, backward, optimizer step) in memory_probe.json and skip the final checkpoint. "
                              "The Memory tab's measured comparison sets it.", "Memory probe")
    report_to: list = spec([], "Experiment trackers that get a copy of the metrics (transformers' report_to): "
                           "tensorboard, trackio, mlflow, wandb; each writes inside the run directory and "
                           "a missing or failing one never fails the run.", "Report to (trackers)", kind="list",
                           choices_from=REPORT_TO_CHOICES)


@dataclass
class EvalSection:
    """Task metrics: at every evaluation, greedy answers to a fixed subset of held-out prompts, scored."""

    metric: str = spec("none", "Score greedy answers to held-out prompts at every evaluation (and the base before "
                       f"step 0): {', '.join(METRICS)}; none keeps eval loss only.", "Task metric",
                       choices_from=metric_choices)
    num_samples: int = spec(32, "How many held-out prompts to answer at each evaluation (the first N, the same "
                            "every time); generation costs time, so keep it small.", "Prompts scored",
                            rule="must be a positive integer", ge=1, le=100_000)
    max_new_tokens: int = spec(128, "Longest answer generated for scoring, in tokens.", "Answer tokens",
                               rule="must be a positive integer", ge=1, le=32_768)
    schema_path: str | None = spec(None, "JSON Schema file the json_schema metric validates answers against.",
                                   "JSON Schema file", kind="str", optional=True)
    pattern: str | None = spec(None, "Regular expression the regex metric looks for in each answer.",
                               "Regex pattern", kind="str", optional=True)


@dataclass
class DistributedSection:
    """Data-parallel (DDP) and sharded (FSDP) training through Hugging Face accelerate's launcher.

    ``engine.config.build.to_accelerate_config`` turns it into accelerate's config file and the
    launch command of each machine; the worker then runs once per process.
    """

    strategy: str = spec("none", "none (one process), ddp (every GPU holds the whole model and a copy of the "
                         "optimizer state; gradients are averaged) or fsdp (weights, gradients and optimizer state "
                         "sharded across GPUs). Without GPUs the processes run on the CPU over gloo.",
                         "Multi-GPU strategy", choices_from=STRATEGIES)
    num_processes: int = spec(1, "Processes on each machine, one per GPU.", "Processes per machine",
                              rule="must be a positive integer", ge=1, le=1024)
    gpu_ids: str = spec("all", "Which GPUs of this machine to use: all, or NVML indices such as 0,1 (one per "
                        "process).", "GPU ids", rule="must be 'all' or GPU indices such as 0,1")
    num_machines: int = spec(1, "Machines taking part; above 1, run the launch command written for each machine "
                             "(run directory, accelerate/) on that machine.", "Machines",
                             rule="must be a positive integer", ge=1, le=4096)
    main_process_ip: str | None = spec(None, "Address of machine 0, reachable from every machine (multi-machine "
                                       "runs only).", "Main machine address", kind="str", optional=True)
    main_process_port: int = spec(0, "Port machine 0 listens on; 0 picks a free port (one machine only).",
                                  "Main port", rule="must be an integer from 0 to 65535", ge=0, le=65535)
    fsdp_sharding_strategy: str = spec("FULL_SHARD", "FSDP: what is sharded. FULL_SHARD (weights, gradients, "
                                       "optimizer state), SHARD_GRAD_OP (gradients and optimizer state), "
                                       "HYBRID_SHARD (full within a machine, replicated across machines) or "
                                       "NO_SHARD (DDP-like).", "FSDP sharding", choices_from=FSDP_SHARDING)
    fsdp_auto_wrap_policy: str = spec("TRANSFORMER_BASED_WRAP", "FSDP: which modules become shards. "
                                      "TRANSFORMER_BASED_WRAP wraps each decoder layer (the model's "
                                      "_no_split_modules), SIZE_BASED_WRAP by parameter count, NO_WRAP the whole "
                                      "model as one unit.", "FSDP auto-wrap", choices_from=FSDP_WRAP)
    fsdp_offload_params: bool = spec(False, "FSDP: keep parameters and optimizer state in CPU memory between uses "
                                     "(less GPU memory, slower steps).", "FSDP CPU offload")
    fsdp_cpu_ram_efficient_loading: bool = spec(True, "FSDP: only rank 0 reads the weights and broadcasts them, so "
                                                "the machine's RAM holds one copy, not one per process.",
                                                "FSDP RAM-efficient loading")

    @property
    def world_size(self) -> int:
        """Processes in all (every machine's)."""
        return self.num_processes * self.num_machines if _is_int(self.num_processes) and \
            _is_int(self.num_machines) else 1

    def gpu_id_list(self) -> list[int] | None:
        """The chosen GPU indices, None for all (or when the text is not a list of indices)."""
        text = str(self.gpu_ids or "all").strip()
        if text == "all":
            return None
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            return None


SECTIONS = {"model": ModelSection, "data": DataSection, "lora": LoraSection, "quant": QuantSection,
            "train": TrainSection, "eval": EvalSection, "distributed": DistributedSection}


@dataclass
class RunConfig:
    name: str | None = spec(None, "Run name; a timestamped one is made when empty.", "Run name", kind="str",
                            optional=True)
    description: str = spec("", "Free text shown in the runs table.", "Description", optional=True)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    # ------------------------------------------------------------------ derived
    @property
    def early_stopping_greater_is_better(self) -> bool:
        """Whether a higher ``train.early_stopping_metric`` is better (auto: a task score's is, a loss's is not)."""
        direction = self.train.early_stopping_direction
        if direction == "auto":
            return self.train.early_stopping_metric == "task_score"
        return direction == "higher"

    @property
    def method(self) -> str:
        """The method name shown everywhere (runs table, memory, lineage): derived here only."""
        if not self.lora.use_peft:
            return "full"
        if self.quant.load_in_4bit:
            return "qlora"
        if self.quant.load_in_8bit:
            return "lora8bit"
        if self.lora.use_dora:
            return "dora"
        if self.lora.use_rslora:
            return "rslora"
        return "lora"

    def set_method(self, method: str) -> None:
        """Switch method by setting the fields that define it."""
        if method not in METHODS:
            raise ConfigError("method",
                              f"'{method}' is not one of {', '.join(METHODS)}{suggest(str(method), METHODS)}.")
        self.lora.use_peft = method != "full"
        self.quant.load_in_4bit = method == "qlora"
        self.quant.load_in_8bit = method == "lora8bit"
        self.lora.use_dora = method == "dora"
        self.lora.use_rslora = method == "rslora"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.field`` -> value, for diffs and tables."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict) and key in SECTIONS:
                flat.update({f"{key}.{name}": item for name, item in value.items()})
            else:
                flat[key] = value
        return flat

    def get(self, dotted: str) -> Any:
        section, _, name = dotted.partition(".")
        return getattr(getattr(self, section), name) if name else getattr(self, section)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "config") -> RunConfig:
        if data is not None and not isinstance(data, dict):
            raise ConfigError(source, "the top level must be a mapping of sections (model, data, lora, ...).")
        config = cls()
        for key, value in (data or {}).items():
            config.set(str(key), value, source=source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "no such preset or config file.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}", f"not valid YAML ({getattr(error, 'problem', error)}).") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(str(path), f"cannot be read ({error}).") from None
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
        if key == "method":  # accepted as a convenience, stored as the fields it implies
            self.set_method(str(value))
            return
        top = {f.name for f in dataclasses.fields(self)}
        if key not in top:
            raise ConfigError(key, f"unknown key in {source}{suggest(key, list(top) + ['method'])}.")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a mapping of fields, got {value!r}.")
            section = getattr(self, key)
            names = {f.name for f in dataclasses.fields(section)}
            for name, item in value.items():
                if name not in names:
                    raise ConfigError(f"{key}.{name}", f"unknown field in {source}{suggest(str(name), names)}.")
                setattr(section, name, field_spec(f"{key}.{name}").coerce(item))
        else:
            setattr(self, key, field_spec(key).coerce(value))

    # ------------------------------------------------------------------ validation
    def errors(self) -> list[ConfigError]:
        """Every problem found without loading the model, each naming field, value and range."""
        problems = []
        for item in field_specs():
            message = item.problem(self.get(item.path))
            if message:
                problems.append(ConfigError(item.path, message))
        bad = {p.field for p in problems}
        problems += [p for p in self._cross_field_errors() if p.field not in bad]
        return problems

    def _cross_field_errors(self) -> list[ConfigError]:
        """Rules that span fields; each names the field a person should change."""
        lora, train, quant, data = self.lora, self.train, self.quant, self.data
        found = []

        def check(ok: bool, name: str, message: str):
            if not ok:
                found.append(ConfigError(name, message))

        check(not (quant.load_in_4bit and quant.load_in_8bit), "quant.load_in_8bit", "choose 4 bit or 8 bit, not both.")
        check(lora.use_peft or not (quant.load_in_4bit or quant.load_in_8bit), "lora.use_peft",
              "a quantized base cannot be fully fine-tuned (its weights are frozen integers): keep use_peft on "
              "(LoRA/QLoRA) or load the base unquantized.")
        check(not (lora.use_dora and quant.load_in_8bit), "lora.use_dora", "DoRA is not supported on an 8-bit base.")
        check(not (data.format == "text" and train.assistant_only_loss), "train.assistant_only_loss",
              "plain-text data has no assistant turns: set it to false for continued pre-training.")
        check(not (train.lr_scheduler_type == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"}
                   & set(train.lr_scheduler_kwargs or {})), "train.lr_scheduler_kwargs",
              "cosine_with_min_lr needs min_lr or min_lr_rate, e.g. lr_scheduler_kwargs={min_lr_rate: 0.1}.")
        if quant.load_in_4bit or quant.load_in_8bit:
            import importlib.util

            check(importlib.util.find_spec("bitsandbytes") is not None, "quant.load_in_4bit",
                  "4-bit and 8-bit loading require the bitsandbytes package: pip install bitsandbytes.")
        if self.eval.metric != "none":
            held_out = bool(data.eval_path) or (_is_num(data.eval_fraction) and data.eval_fraction > 0)
            check(held_out, "eval.metric",
                  "a task metric scores answers to held-out prompts: set data.eval_path or a data.eval_fraction "
                  "above 0, or set eval.metric to none.")
            found += option_problems(self.eval.metric, self.eval.schema_path, self.eval.pattern)
        if train.early_stopping_patience and _is_int(train.early_stopping_patience):
            held_out = bool(data.eval_path) or (_is_num(data.eval_fraction) and data.eval_fraction > 0)
            check(held_out, "train.early_stopping_patience",
                  "early stopping compares evaluations on held-out rows: set data.eval_path or a data.eval_fraction "
                  "above 0, or set the patience to 0.")
        check(not (train.early_stopping_metric == "task_score" and self.eval.metric == "none"),
              "train.early_stopping_metric", "task_score needs a task metric: set eval.metric (e.g. json_equal) "
              "or watch eval_loss.")
        found += self._distributed_errors()
        if self.name is not None:
            problem = name_problem(self.name)
            check(problem is None, "name", f"{problem}, got {self.name!r}.")
        return found

    def _distributed_errors(self) -> list[ConfigError]:
        """What accelerate could not run: refused here, before any process starts, each in one sentence."""
        dist, quant = self.distributed, self.quant
        found = []

        def check(ok: bool, name: str, message: str):
            if not ok:
                found.append(ConfigError(name, message))

        if not all(_is_int(v) for v in (dist.num_processes, dist.num_machines, dist.main_process_port)):
            return found  # the field rules already named it
        text = str(dist.gpu_ids or "").strip()
        ids = dist.gpu_id_list()
        check(text == "all" or (ids is not None and ids and all(i >= 0 for i in ids) and len(set(ids)) == len(ids)),
              "distributed.gpu_ids", f"must be 'all' or distinct GPU indices separated by commas (e.g. 0,1), got "
                                     f"{dist.gpu_ids!r}.")
        if dist.strategy == "none":
            check(dist.world_size == 1, "distributed.strategy",
                  f"{dist.world_size} processes need a strategy: ddp (replicated model) or fsdp (sharded), or set "
                  "distributed.num_processes and distributed.num_machines to 1.")
            return found
        check(dist.world_size >= 2, "distributed.num_processes",
              f"{dist.strategy} needs at least 2 processes in all (num_processes × num_machines), got "
              f"{dist.num_processes} × {dist.num_machines}; or set distributed.strategy to none.")
        if ids is not None and ids:
            check(len(ids) == dist.num_processes, "distributed.gpu_ids",
                  f"names {len(ids)} GPU{'s' if len(ids) != 1 else ''} ({dist.gpu_ids}) for "
                  f"{dist.num_processes} processes: give one GPU per process.")
        from engine.config.gpus import visible_gpus  # NVML, read once: a machine check like bitsandbytes' above

        gpus = visible_gpus()
        if gpus:  # a GPU machine: one process per GPU (without GPUs, the processes share the CPU over gloo)
            seen = ", ".join(f"{i}: {name}" for i, name in enumerate(gpus))
            check(dist.num_processes <= len(gpus), "distributed.num_processes",
                  f"{dist.num_processes} processes need {dist.num_processes} GPUs, but NVML sees {len(gpus)} on "
                  f"this machine ({seen}).")
            check(not ids or max(ids) < len(gpus), "distributed.gpu_ids",
                  f"{dist.gpu_ids} names a GPU this machine does not have; NVML sees {seen}.")
        else:
            # accelerate 1.15 turns FSDP on only for GPU-like process types: CPU processes (MULTI_CPU) would train
            # as plain data parallel, silently (tried: same losses as DDP, unsharded checkpoints), and with
            # RAM-efficient loading its FSDP plugin refuses a machine without an accelerator.
            check(dist.strategy != "fsdp", "distributed.strategy",
                  "FSDP needs GPUs (accelerate shards only across GPU processes; on the CPU it would silently run "
                  "as DDP) and NVML sees none here: use ddp to try a multi-process run on the CPU, or run this "
                  "config on a GPU machine.")
        if dist.num_machines > 1:
            check(bool(dist.main_process_ip), "distributed.main_process_ip",
                  f"{dist.num_machines} machines need the address of machine 0 that every machine can reach.")
            check(dist.main_process_port != 0, "distributed.main_process_port",
                  "machines must agree on the port of machine 0: 0 (a free port) works on one machine only; "
                  "29500 is accelerate's usual choice.")
        if dist.strategy == "fsdp":
            check(not quant.load_in_8bit, "distributed.strategy",
                  "FSDP cannot shard 8-bit bitsandbytes weights (int8 with separate scales): use ddp, or QLoRA "
                  "(4 bit) with quant.bnb_4bit_quant_storage set to the compute dtype.")
            check(not quant.load_in_4bit or quant.bnb_4bit_quant_storage == quant.bnb_4bit_compute_dtype,
                  "quant.bnb_4bit_quant_storage",
                  f"QLoRA with FSDP needs the 4-bit weights stored in the compute dtype so FSDP can flatten them "
                  f"with the other weights: set it to {quant.bnb_4bit_compute_dtype}, got "
                  f"{quant.bnb_4bit_quant_storage!r}.")
        check(self.eval.metric == "none", "eval.metric",
              f"task metrics generate answers in one process, and a {dist.strategy} run has several: set "
              "eval.metric to none (eval loss is still measured on every process), or distributed.strategy to "
              "none.")
        check(not self.train.memory_probe, "train.memory_probe",
              "a measurement run measures one process: set distributed.strategy to none.")
        return found

    def validate(self) -> RunConfig:
        problems = self.errors()
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise ConfigError("config", "; ".join(str(p) for p in problems))
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Names people type from other tools, mapped to ours for the "did you mean" hint.
SYNONYMS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
            "batch_size": "per_device_train_batch_size", "max_seq_length": "max_length", "epochs": "num_train_epochs",
            "scheduler": "lr_scheduler_type", "optimizer": "optim", "warmup_ratio": "warmup_steps"}


def suggest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest option (or a known synonym), else ''."""
    options = list(options)
    if SYNONYMS.get(word) in options:
        return f" (did you mean '{SYNONYMS[word]}'?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------- reading the specs
_SPECS: dict[str, FieldSpec] = {}


def field_specs() -> list[FieldSpec]:
    """Every field of a run, in declaration order, as ``FieldSpec``s (built once from the metadata)."""
    if not _SPECS:
        top = [(f, "") for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
        nested = [(f, f"{name}.") for name, section in SECTIONS.items() for f in dataclasses.fields(section)]
        for item, prefix in top + nested:
            meta = dict(item.metadata)
            default = item.default_factory() if item.default is dataclasses.MISSING else item.default
            path = prefix + item.name
            _SPECS[path] = FieldSpec(path=path, default=default, help=meta.pop("help"),
                                     label=meta.pop("label") or item.name, kind=meta.pop("kind"), **meta)
    return list(_SPECS.values())


def field_spec(path: str) -> FieldSpec:
    field_specs()
    try:
        return _SPECS[path]
    except KeyError:
        raise ConfigError(path, f"unknown field{suggest(path, _SPECS)}.") from None


def field_help() -> dict[str, str]:
    """``section.field`` -> help text, for the UI and the CLI's --help."""
    return {item.path: item.help for item in field_specs()}
