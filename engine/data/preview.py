"""A row as the trainer sees it: the chat template, the token ids and the loss mask.

This mirrors what TRL 1.16's ``SFTTrainer`` does with a conversational dataset under
``SFTConfig`` with ``assistant_only_loss=True, max_length=N`` (``trl/trainer/sft_trainer.py``,
``__init__`` and ``_prepare_dataset``):

1. the template: the tokenizer's own if it has ``{% generation %}`` markers, otherwise
   ``trl.chat_template_utils.get_training_chat_template(tokenizer)``;
2. ``tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
   return_assistant_tokens_mask=True, chat_template=..., tools=None)``;
3. labels = ids where the assistant mask is 1, else -100;
4. truncation keeps the first ``max_length`` tokens, and a row left with no trained token
   is dropped.

Plain ``text`` rows follow TRL's language-modelling path: the EOS token is appended when
missing, ``tokenizer(text=...)`` tokenizes, and every token is trained on.
``tests/test_data_mask.py`` compares the result with the labels of a real ``SFTTrainer``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.errors import DataError, LoraLabError, ModelNotFoundError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and TRL) ignore
TRAINED = "trained"
CUT_OFF = "cut off by max_length"


@dataclass
class TemplateInfo:
    """Which chat template training would use, and what is wrong with it if anything."""

    chat_template: str | None  # passed to apply_chat_template; None means the tokenizer's own
    origin: str  # "tokenizer", "trl training template" or "none"
    problem: str | None = None  # set when chat rows cannot be rendered with a loss mask
    warnings: list[str] = field(default_factory=list)


@dataclass
class EncodedRow:
    """Token ids and the per-token loss mask of one row, before truncation."""

    input_ids: list[int]
    trained: list[bool]
    max_length: int | None

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def kept(self) -> int:
        return self.length if self.max_length is None else min(self.length, self.max_length)

    @property
    def truncated(self) -> bool:
        return self.kept < self.length

    @property
    def tokens_lost(self) -> int:
        return self.length - self.kept

    @property
    def trained_tokens(self) -> int:
        """Tokens that contribute to the loss after truncation."""
        return sum(self.trained[: self.kept])

    @property
    def labels(self) -> list[int]:
        """The labels TRL builds for this row (after truncation)."""
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids[: self.kept], self.trained[: self.kept])]


# A cached tokenizer (``load_tokenizer(fresh=False)``) is shared by every caller, and a fast
# tokenizer must not encode from two threads at once: hold this while using one. Previews
# encode a handful of rows, so taking turns is cheap; long passes load a fresh one instead.
SHARED_TOKENIZER_USE = threading.Lock()


def load_tokenizer(model: str = "demo", fresh: bool = False):
    """The tokenizer of ``model``: ``demo``, a local folder, or a hub id (fails fast offline).

    Cached by folder, since the Dataset tab asks for it on every page. ``fresh=True`` loads
    a private instance: a fast tokenizer must not be used from two threads at once (its
    Rust state is borrowed mutably), so a background pass gets its own.
    """
    from engine.hub import resolve_model

    path = resolve_model((model or "").strip() or "demo", what="model")
    if fresh:
        return _read_tokenizer(path)
    stamp = Path(path).stat().st_mtime if Path(path).exists() else 0.0
    return _cached_tokenizer(path, stamp)


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, _stamp: float):
    return _read_tokenizer(path)


def _read_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except LoraLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for a folder without one
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(f"No tokenizer could be loaded from '{path}': {first_line}") from None


def training_template(tokenizer) -> TemplateInfo:
    """The template ``SFTTrainer(assistant_only_loss=True)`` would use for this tokenizer."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    if not tokenizer.chat_template:
        return TemplateInfo(
            None,
            "none",
            problem=(
                "The tokenizer has no chat template, so chat rows cannot be rendered for training; pick a model "
                "whose tokenizer ships one (an instruct model), or use the text format."
            ),
        )
    if has_generation_markers(tokenizer.chat_template):
        info = TemplateInfo(None, "tokenizer")
    else:
        try:
            info = TemplateInfo(get_training_chat_template(tokenizer), "trl training template")
        except ValueError:
            return TemplateInfo(
                None,
                "none",
                problem=(
                    "The chat template has no {% generation %} markers and TRL has no training version of it, "
                    "so the assistant-only loss mask cannot be computed; add the markers around assistant turns."
                ),
            )
    try:
        stop_trained = is_chat_template_stop_token_trained(tokenizer, chat_template=info.chat_template)
    except Exception:  # noqa: BLE001 - an odd template may fail this probe; the mask itself is what counts
        stop_trained = True
    if not stop_trained:
        info.warnings.append(
            "The chat template leaves the assistant's end-of-turn token out of the loss mask, so the model may "
            "not learn to stop."
        )
    return info


def encode_row(tokenizer, row: dict, template: TemplateInfo, max_length: int | None) -> EncodedRow:
    """Token ids and loss mask of a normalised row, exactly as TRL prepares it."""
    if "text" in row:
        text = row["text"]
        eos = tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        ids = list(tokenizer(text=text)["input_ids"])
        return EncodedRow(ids, [True] * len(ids), max_length)
    if template.problem:
        raise DataError(template.problem)
    try:
        output = tokenizer.apply_chat_template(
            row["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=template.chat_template,
            tools=None,
        )
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError for e.g. "roles must alternate"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"The chat template cannot render this row: {first_line}") from None
    ids = list(output["input_ids"])
    mask = [bool(m) for m in output["assistant_masks"]]
    return EncodedRow(ids, mask, max_length)


def render_segments(tokenizer, encoded: EncodedRow) -> list[tuple[str, str | None]]:
    """(text, label) runs for display: ``trained``, ``cut off by max_length`` or None (masked).

    Runs of tokens in the same state are decoded together, so characters split over
    several byte-level tokens still decode whole.
    """
    segments: list[tuple[str, str | None]] = []
    run: list[int] = []
    run_state: str | None = None
    for index, (token_id, trained) in enumerate(zip(encoded.input_ids, encoded.trained)):
        state = CUT_OFF if index >= encoded.kept else (TRAINED if trained else None)
        if run and state != run_state:
            segments.append((_decode(tokenizer, run), run_state))
            run = []
        run.append(token_id)
        run_state = state
    if run:
        segments.append((_decode(tokenizer, run), run_state))
    return segments


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
