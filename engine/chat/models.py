"""Chat with a fine-tuned model and its base side by side, on one copy of the base.

The base model is loaded once and wrapped in PEFT; the "base" side generates inside
``PeftModel.disable_adapter()`` and the "fine-tuned" side with the adapter active, so the
comparison costs one base model in memory. Several adapters trained on the same base are
kept loaded under their own PEFT adapter names and switched with ``set_adapter``; so the left
("base") side can also be a second adapter of the same base (``load(source, against=...)``), as
when a release's current version is judged beside its previous one.

Both sides use the same messages, sampling settings and seed (re-seeded before each
side), so differences come from the adapter. They run one after the other in one worker
thread, because adapter on/off is a property of the one shared model; each streams token
by token through ``TextIteratorStreamer``, and a ``StoppingCriteria`` bound to a
``threading.Event`` stops both at the next token.

Every request is bounded before the costly part (``engine.limits``): a conversation above
``max_prompt_chars`` is refused before it is tokenized; one that leaves no room in the model's
context (``max_position_embeddings``) is refused, and ``max_new_tokens`` is lowered to the room
left, said in a sentence (``fit``); each side stops after ``max_generation_s`` (transformers'
``max_time``). A client that leaves closes the stream, which stops generation at the next token.

Around it: what to load (``engine.chat.sources``), prompt sets (``engine.chat.prompts``),
blind ratings and the win rate (``engine.chat.ratings``) and ``python -m engine compare``
(``engine.chat.cli``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.chat.prompts import PromptItem
from engine.chat.ratings import BASE, FINETUNED
from engine.chat.sources import (
    AdapterSource,
    adapter_weights_time,
)
from engine.errors import ConfigError, LimitError, LoraLabError, ModelNotFoundError, RunError
from engine.evals.metrics import token_f1
from engine.hub import resolve_model
from engine.limits import env_name, limits

MAX_ADAPTERS = 8  # adapters are small, but a dashboard left open for days should not grow without bound
SIDES = (BASE, FINETUNED)
# Our sentence for each field transformers' GenerationConfig.validate checks (see Sampling.validated).
SAMPLING_RANGES = {"max_new_tokens": "must be a positive integer"}


# ----------------------------------------------------------------------------- sampling settings
@dataclass
class Sampling:
    """Generation settings shared by both sides.

    Low temperature by default: a fine-tune is judged by the answer it prefers, and at 0.7 a
    small model's flat tail of unlikely tokens gets sampled often enough to garble a structured
    answer (one wrong token in a JSON object of ~50). At 0.2 a token 1 nat less likely than the
    best is 150x rarer than the best instead of 4x, so each side shows what it learned, while
    a different seed still gives a different answer where the model is really unsure.
    """

    temperature: float = 0.2
    top_p: float = 0.9
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int = 0
    greedy: bool = False
    min_new_tokens: int = 0  # benchmarks force a fixed length; the UI leaves it at 0

    def validated(self) -> Sampling:
        """Self, or a ``ConfigError`` naming the field and its allowed range.

        ``GenerationConfig.validate(strict=True)`` checks what transformers checks on its own
        (max_new_tokens > 0, flags that contradict greedy decoding). The ranges checked first are
        ones it leaves to the logits processors, which would refuse them only inside ``generate()``,
        mid-stream.
        """
        checks = [
            (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 5, "temperature",
             f"must be from 0 to 5, got {self.temperature!r}."),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
             f"must satisfy 0 < top_p <= 1, got {self.top_p!r}."),
            (isinstance(self.max_new_tokens, int), "max_new_tokens",
             f"must be a positive integer, got {self.max_new_tokens!r}."),
            (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 10,
             "repetition_penalty", f"must be above 0 and at most 10 (1 means none), got {self.repetition_penalty!r}."),
            (isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}."),
            (isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0, "min_new_tokens",
             f"must be an integer >= 0, got {self.min_new_tokens!r}."),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(name, message)
        from transformers import GenerationConfig

        try:
            GenerationConfig(**self.generate_kwargs()).validate(strict=True)
        except ValueError as error:
            detail = " ".join(str(error).split())
            name = next((f for f in self.__dataclass_fields__ if f"`{f}`" in detail), None)
            if name in SAMPLING_RANGES:
                raise ConfigError(name, f"{SAMPLING_RANGES[name]}, got {getattr(self, name)!r}.") from None
            raise ConfigError(name or "sampling", f"transformers refuses these settings: {detail}") from None
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=float(self.repetition_penalty))
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, self.max_new_tokens)
        if self.is_greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p), top_k=None)
        return kwargs

    def describe(self) -> str:
        how = "greedy" if self.is_greedy else f"temperature {self.temperature:g}, top-p {self.top_p:g}"
        return (f"{how}, up to {self.max_new_tokens} new tokens, repetition penalty {self.repetition_penalty:g}, "
                f"seed {self.seed}")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["greedy"] = self.is_greedy
        if not data["min_new_tokens"]:
            del data["min_new_tokens"]
        return data


# ----------------------------------------------------------------------------- the model cache
def _flatten_content(content) -> str:
    """Message content as text (chat UIs may send a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_flatten_content(part) for part in content)
    return "" if content is None else str(content)


def clean_messages(messages) -> list[dict]:
    """Keep role and text of each message (drops UI metadata, flattens multi-part content)."""
    return [{"role": m.get("role"), "content": _flatten_content(m.get("content"))}
            for m in messages or [] if m.get("role") in ("system", "user", "assistant")]


def check_prompt_size(messages: list[dict]) -> None:
    """Refuse, before tokenizing, a conversation longer than ``max_prompt_chars`` characters."""
    size, cap = sum(len(m.get("content") or "") for m in messages), limits().max_prompt_chars
    if size > cap:
        raise LimitError(f"The conversation is {size:,} characters, above the {cap:,}-character limit "
                         f"({env_name('max_prompt_chars')}); shorten the message or press Clear.")


def _stop_criteria(events):
    """A StoppingCriteria that ends generation at the next token once any event is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = any(event.is_set() for event in events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([EventStop()])


class StopSignals:
    """One stop event per caller (a browser session), so Stop in one tab never ends another's answer.

    ``fresh`` hands out a new event when generation starts; ``stop`` sets the caller's latest
    one. Bounded: sessions abandoned without a Stop cannot pile up in a dashboard left open.
    """

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._events: OrderedDict[str, threading.Event] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: str) -> threading.Event:
        with self._lock:
            event = self._events[key] = threading.Event()
            self._events.move_to_end(key)
            while len(self._events) > self.keep:
                self._events.popitem(last=False)
            return event

    def stop(self, key: str) -> bool:
        """Set ``key``'s event; False when it never started anything (or was dropped as the oldest)."""
        with self._lock:
            event = self._events.get(key)
        if event is not None:
            event.set()
        return event is not None


@dataclass
class Comparison:
    """One prompt answered by both sides."""

    prompt: str
    base: str
    finetuned: str
    reference: str | None = None
    messages: list = field(default_factory=list, repr=False)

    @property
    def base_f1(self) -> float | None:
        return None if self.reference is None else token_f1(self.base, self.reference)

    @property
    def finetuned_f1(self) -> float | None:
        return None if self.reference is None else token_f1(self.finetuned, self.reference)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "base": self.base, "finetuned": self.finetuned, "reference": self.reference,
                "base_f1": self.base_f1, "finetuned_f1": self.finetuned_f1}


class ChatModels:
    """One base model in memory at a time, with up to ``MAX_ADAPTERS`` of its adapters.

    Thread-safe: loading and generating take one lock, because which adapter is active
    (and whether adapters are on at all) is state of the one shared model.
    """

    def __init__(self, device: str | None = None):
        self._lock = threading.RLock()
        self._device = device
        self.model = None  # a peft.PeftModel around the base
        self.base_loads = 0  # how many times a base model was read from disk (tests and the status line)
        self._base_key: tuple | None = None
        self._base_info: dict = {}
        self._adapters: OrderedDict[str, dict] = OrderedDict()  # str(path) -> {name, mtime, label, tokenizer}
        self._next_name = 0
        self.active: AdapterSource | None = None
        self.against: AdapterSource | None = None  # the left side's adapter; None: the base, adapter off
        self.notes: list[str] = []
        self.generating = 0  # generations running inside the model right now (0 once stopped)

    # ------------------------------------------------------------------ loading
    @property
    def loaded(self) -> bool:
        return self.model is not None and self.active is not None

    @property
    def tokenizer(self):
        return self._adapters[str(self.active.path)]["tokenizer"] if self.active else None

    def _side_source(self, side: str) -> AdapterSource | None:
        """The adapter that answers for ``side``; None for the base with the adapter off."""
        return self.active if side == FINETUNED else self.against

    def _side_tokenizer(self, side: str):
        """Each adapter's own tokenizer (a release carries its chat template); the active one's for the base."""
        source = self._side_source(side) or self.active
        return self._adapters[str(source.path)]["tokenizer"]

    def side_labels(self) -> dict[str, str]:
        """What each side is, in words: {BASE: left, FINETUNED: right}."""
        if not self.loaded:
            return {BASE: "Base model (adapter off)", FINETUNED: "Fine-tuned model (adapter on)"}
        left = self.against.label if self.against else "Base model (adapter off)"
        return {BASE: left, FINETUNED: self.active.label}

    def _plan(self, source: AdapterSource) -> dict:
        """Device, dtype and quantization for this base, as the run was trained where possible."""
        import importlib.util

        from engine.config.build import decide_runtime, model_load_kwargs

        config = _source_config(source)
        quant = config.quant
        notes = []
        if (quant.load_in_4bit or quant.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
            notes.append("This run was trained on a quantized base, but bitsandbytes is not installed: the base "
                         "is loaded unquantized, so answers may differ slightly from the trained model's.")
            quant.load_in_4bit = quant.load_in_8bit = False
        runtime = decide_runtime(config, device=self._device)
        device = self._device or runtime.device
        kwargs = model_load_kwargs(config, runtime, training=False)
        kwargs.pop("attn_implementation", None)  # generation keeps the model's own default kernel
        if quant.load_in_4bit:
            double = ", double quantization" if quant.bnb_4bit_use_double_quant else ""
            precision = (f"4-bit {quant.bnb_4bit_quant_type.upper()} (bitsandbytes{double}), "
                         f"computing in {runtime.compute_dtype}, as it was trained")
        elif quant.load_in_8bit:
            precision = f"8-bit (bitsandbytes), computing in {runtime.compute_dtype}, as it was trained"
        else:
            precision = str(kwargs["dtype"]).replace("torch.", "")
        return {"device": device, "kwargs": kwargs, "quantized": "quantization_config" in kwargs,
                "precision": precision, "notes": notes}

    def _load_base(self, source: AdapterSource, base_path: str, plan: dict):
        from transformers import AutoModelForCausalLM

        self.unload()
        kwargs = dict(plan["kwargs"])
        if plan["quantized"] and plan["device"].startswith("cuda"):
            kwargs["device_map"] = {"": plan["device"]}
        started = time.time()
        try:
            model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        except OSError as error:
            raise ModelNotFoundError(f"The base model '{source.base_model}' could not be loaded from {base_path}: "
                                     f"{str(error).splitlines()[0]}") from None
        if not plan["quantized"]:
            model.to(plan["device"])
        model.eval()
        self.base_loads += 1
        return model, time.time() - started

    def _base_of(self, source: AdapterSource) -> tuple[str, dict, tuple]:
        """(base path, loading plan, key): two sources with one key share one copy of the base in memory."""
        base_path = resolve_model(source.base_model)
        plan = self._plan(source)
        key = (os.path.realpath(base_path) if os.path.exists(base_path) else base_path, source.revision,
               source.quant, plan["device"])
        return base_path, plan, key

    def load(self, source: AdapterSource, against: AdapterSource | None = None) -> str:
        """Make ``source`` the active adapter (the right side), loading its base only if it is not the one in
        memory. ``against``, when given, answers on the left instead of the base: another adapter of the same
        base (a release's previous version, a sibling run), loaded beside it on the one copy of the base."""
        with self._lock:
            base_path, plan, key = self._base_of(source)
            if against is not None and self._base_of(against)[2] != key:
                raise RunError(
                    f"{against.label} and {source.label} were not trained on the same base model loaded the same "
                    f"way ({against.base_model} and {source.base_model}): the two sides share one copy of the base, "
                    "so compare adapters of one base, or leave the left side empty to compare with the base.")
            if key != self._base_key or (self.model is None and "base" not in self._base_info):
                base, seconds = self._load_base(source, base_path, plan)
                self._base_key = key
                self._base_info = {"name": source.base_model, "path": base_path, "device": plan["device"],
                                   "precision": plan["precision"], "seconds": seconds, "base": base}
                self.notes = plan["notes"]
            if against is not None:
                self._activate_adapter(against)
            self._activate_adapter(source)
            self.active, self.against = source, against
            return self.describe()

    def _activate_adapter(self, source: AdapterSource) -> None:
        key = str(source.path)
        mtime = adapter_weights_time(source.path)
        known = self._adapters.get(key)
        if known is None or known["mtime"] != mtime:  # new, or rewritten since (adapter/ at the end of a run)
            name = f"adapter_{self._next_name}"
            self._next_name += 1
            self._load_adapter_weights(source, name)
            if known is not None:
                self.model.delete_adapter(known["name"])
            tokenizer, note = self._load_tokenizer(source)
            self._adapters[key] = {"name": name, "mtime": mtime, "label": source.label,
                                   "tokenizer": tokenizer, "note": note}
        self._adapters.move_to_end(key)
        self.model.set_adapter(self._adapters[key]["name"])
        while len(self._adapters) > MAX_ADAPTERS:
            _, oldest = self._adapters.popitem(last=False)
            self.model.delete_adapter(oldest["name"])

    def _load_adapter_weights(self, source: AdapterSource, name: str) -> None:
        from peft import PeftModel

        try:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self._base_info["base"], str(source.path), adapter_name=name)
                self._base_info.pop("base")  # the PeftModel holds it now
                self.model.eval()
            else:
                self.model.load_adapter(str(source.path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise RunError(f"The adapter {source.path} does not fit the base model '{source.base_model}': "
                           f"{first_line}") from None

    def _load_tokenizer(self, source: AdapterSource):
        """The tokenizer saved with the adapter (what training used), else the base's; and a warning or None.

        A vocabulary that differs from the base's means the base changed since training
        (a rebuilt demo model, a different revision): the answers would be nonsense, so say so.
        """
        from transformers import AutoTokenizer

        base_folder = self._base_info["path"]
        load = lambda folder: AutoTokenizer.from_pretrained(str(folder), trust_remote_code=source.trust_remote_code)
        note = None
        if (source.path / "tokenizer_config.json").is_file():
            tokenizer = load(source.path)
            if os.path.isdir(base_folder) and (Path(base_folder) / "tokenizer_config.json").is_file():
                if load(base_folder).get_vocab() != tokenizer.get_vocab():
                    note = (f"Warning: the tokenizer saved with {source.label} differs from the base model's; the base "
                            "has probably changed since this adapter was trained, so its answers may be nonsense.")
        else:
            tokenizer = load(base_folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, note

    def unload(self) -> None:
        with self._lock:
            self.model = None
            self._base_info.pop("base", None)
            self._adapters.clear()
            self._base_key = None
            self.active = self.against = None
            from accelerate.utils import release_memory  # lazy: accelerate imports torch
            release_memory()

    def memory(self) -> dict:
        """Bytes of base weights and of adapter weights in the model, and of the device/process."""
        if self.model is None:
            return {}
        base_bytes = adapter_bytes = 0
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            size = tensor.numel() * tensor.element_size()
            if "lora_" in name:
                adapter_bytes += size
            else:
                base_bytes += size
        result = {"base_bytes": base_bytes, "adapter_bytes": adapter_bytes}
        import torch

        if self._base_info.get("device", "cpu").startswith("cuda") and torch.cuda.is_available():
            result["device_allocated_bytes"] = torch.cuda.memory_allocated()
        try:
            import psutil

            result["process_rss_bytes"] = psutil.Process().memory_info().rss
        except ImportError:
            pass
        return result

    def describe(self) -> str:
        """The load state in words, for the UI and the CLI."""
        if not self.loaded:
            return "Nothing loaded yet: choose a run (or an adapter folder) and press Load."
        info, mem = self._base_info, self.memory()
        mib = lambda n: f"{n / 2**20:,.1f} MiB"
        where = "the GPU" if info["device"].startswith("cuda") else "the CPU"
        base_name = info["name"] if info["name"] == info["path"] else f"{info['name']} ({info['path']})"
        loads = "once" if self.base_loads == 1 else f"{self.base_loads} times in this session"
        lines = [
            f"Base model {base_name} on {where} in {info['precision']}; read from disk {loads} "
            f"(last load {info['seconds']:.1f} s).",
            f"Active adapter: {self.active.label} ({self.active.path}).",
        ]
        if self.against is not None:
            lines.append(f"Left side: {self.against.label} ({self.against.path}), instead of the base with the "
                         "adapter off.")
        shown = {str(self.active.path), str(self.against.path) if self.against else None}
        others = [a["label"] for key, a in self._adapters.items() if key not in shown]
        if others:
            lines.append(f"Also loaded on the same base, switchable without reloading: {', '.join(others)}.")
        memory = f"Memory: base weights {mib(mem['base_bytes'])}, adapters {mib(mem['adapter_bytes'])}"
        if "device_allocated_bytes" in mem:
            memory += f", GPU memory allocated {mib(mem['device_allocated_bytes'])}"
        if "process_rss_bytes" in mem:
            memory += f", process resident memory {mib(mem['process_rss_bytes'])}"
        lines.append(memory + ".")
        lines += self.notes
        for source in (self.against, self.active):
            note = self._adapters[str(source.path)].get("note") if source else None
            if note:
                lines.append(note)
        return "\n".join(lines)

    # ------------------------------------------------------------------ generation
    def _encode(self, messages: list[dict], tokenizer=None):
        tokenizer = tokenizer or self.tokenizer
        if tokenizer.chat_template:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        else:  # a base without a chat template: a plain transcript the model can continue
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            encoded = tokenizer(text, return_tensors="pt")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def context_length(self) -> int | None:
        """Positions the loaded model can read (prompt and answer together), from its config."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def fit(self, conversations: list[list[dict]], sampling: Sampling) -> tuple[Sampling, str | None]:
        """``sampling`` with ``max_new_tokens`` lowered so every conversation's answer fits the model's
        context, and the sentence that says so (None when nothing changed).

        Refuses (``LimitError``) a conversation above ``max_prompt_chars`` before tokenizing, and one
        that leaves no room for an answer.
        """
        conversations = [clean_messages(c) for c in conversations]
        for messages in conversations:
            check_prompt_size(messages)
        with self._lock:
            self._require_loaded()
            longest = max(self._encode(messages, self._side_tokenizer(side))["input_ids"].shape[1]
                          for messages in conversations for side in SIDES)
            context = self.context_length()
        if context is None:
            return sampling, None
        room = context - longest
        if room < 1:
            raise LimitError(f"The conversation is {longest:,} tokens; the model reads at most {context:,} "
                             "(its context), so there is no room for an answer. Shorten it or press Clear.")
        if sampling.max_new_tokens <= room:
            return sampling, None
        fitted = dataclasses.replace(sampling, max_new_tokens=room,
                                     min_new_tokens=min(sampling.min_new_tokens, room))
        return fitted, (f"Max new tokens lowered from {sampling.max_new_tokens:,} to {room:,}: the conversation "
                        f"is {longest:,} tokens and the model reads at most {context:,} (its context).")

    def _generate(self, side: str, messages: list[dict], sampling: Sampling, events, streamer=None):
        """One side's generation; returns the new token ids."""
        import torch

        tokenizer = self._side_tokenizer(side)
        inputs = self._encode(messages, tokenizer)
        kwargs = dict(**inputs, **sampling.generate_kwargs(), stopping_criteria=_stop_criteria(events),
                      pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                      max_time=limits().max_generation_s)
        torch.manual_seed(sampling.seed)  # the same seed for both sides: differences come from the adapter
        self.generating += 1  # under self._lock: callers hold it
        try:
            with torch.inference_mode():
                source = self._side_source(side)
                if source is None:
                    with self.model.disable_adapter():
                        output = self.model.generate(**kwargs)
                else:
                    self.model.set_adapter(self._adapters[str(source.path)]["name"])
                    output = self.model.generate(**kwargs)
        finally:
            self.generating -= 1
        return output[0, inputs["input_ids"].shape[1]:]

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RunError("No model is loaded: choose a run (or an adapter folder) and press Load first.")

    def answer(self, messages: list[dict], side: str, sampling: Sampling, stop_event=None) -> str:
        """One side's full answer (no streaming)."""
        sampling.validated()
        sampling, _ = self.fit([messages], sampling)
        with self._lock:
            self._require_loaded()
            tokens = self._generate(side, clean_messages(messages), sampling,
                                    [stop_event or threading.Event()])
            return self._side_tokenizer(side).decode(tokens, skip_special_tokens=True)

    def stream_pair(self, base_messages: list[dict], tuned_messages: list[dict], sampling: Sampling,
                    stop_event: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """Yield (base text so far, fine-tuned text so far) as tokens arrive, base first, then fine-tuned.

        Setting ``stop_event`` ends the running side at its next token and skips the other;
        abandoning the iterator (a closed browser tab) does the same.
        """
        from transformers import TextIteratorStreamer

        sampling.validated()
        self._require_loaded()
        sampling, _ = self.fit([base_messages, tuned_messages], sampling)  # callers show the note via fit first
        stop = stop_event or threading.Event()
        abandoned = threading.Event()
        streamers = {side: TextIteratorStreamer(self._side_tokenizer(side), skip_prompt=True, skip_special_tokens=True)
                     for side in SIDES}
        prompts = {BASE: clean_messages(base_messages), FINETUNED: clean_messages(tuned_messages)}
        errors: list[BaseException] = []

        def work():
            with self._lock:
                for side in SIDES:
                    if stop.is_set() or abandoned.is_set() or errors:
                        streamers[side].end()
                        continue
                    try:
                        self._generate(side, prompts[side], sampling, [stop, abandoned], streamers[side])
                    except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
                        errors.append(error)
                        streamers[side].end()

        worker = threading.Thread(target=work, name="chat-generate", daemon=True)
        worker.start()
        texts = {BASE: "", FINETUNED: ""}
        try:
            for side in SIDES:
                for chunk in streamers[side]:
                    if chunk:
                        texts[side] += chunk
                        yield texts[BASE], texts[FINETUNED]
            worker.join()
            if errors:
                raise _explain_generation_error(errors[0])
            yield texts[BASE], texts[FINETUNED]
        finally:
            abandoned.set()

    def compare(self, prompts: list[PromptItem], sampling: Sampling, system_prompt: str = "",
                stop_event: threading.Event | None = None) -> Iterator[Comparison]:
        """Answer each prompt with both sides; stops between (and inside) answers when ``stop_event`` is set."""
        stop = stop_event or threading.Event()
        for item in prompts:
            if stop.is_set():
                return
            messages = with_system_prompt(item.messages, system_prompt)
            try:
                answers = {side: self.answer(messages, side, sampling, stop) for side in SIDES}
            except LoraLabError:
                raise
            except Exception as error:  # noqa: BLE001 - explained as a sentence (out of memory, template, ...)
                raise _explain_generation_error(error) from None
            if stop.is_set():
                return  # a half-finished pair would be an unfair comparison
            yield Comparison(prompt=item.text, base=answers[BASE], finetuned=answers[FINETUNED],
                             reference=item.reference, messages=messages)


def _source_config(source: AdapterSource):
    """The base's loading settings as a RunConfig, so chat loads it through engine.config.build like training."""
    from engine.config import RunConfig

    config = RunConfig()
    config.model.name_or_path = source.base_model
    config.model.revision = source.revision
    config.model.trust_remote_code = source.trust_remote_code
    if source.quant:
        config.set("quant", dict(source.quant))
    return config


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Put ``system_prompt`` first, replacing a system turn the messages already have."""
    messages = clean_messages(messages)
    if system_prompt and system_prompt.strip():
        messages = [{"role": "system", "content": system_prompt.strip()}] + [
            m for m in messages if m["role"] != "system"]
    return messages


def _explain_generation_error(error: BaseException) -> BaseException:
    if isinstance(error, LoraLabError):
        return error
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    if "out of memory" in text.lower():
        return RunError("Generation ran out of memory: lower max new tokens or shorten the conversation "
                        "(press Clear).")
    if "chat_template" in text or "chat template" in text.lower():
        return RunError(f"The tokenizer cannot format this conversation: {text}")
    return RunError(f"Generation failed ({type(error).__name__}): {text}")
