"""Chat with a fine-tuned adapter beside its base on one copy of the base, prompt sets, blind ratings."""

from engine.chat.models import (
    SIDES,
    ChatModels,
    Comparison,
    Sampling,
    StopSignals,
    clean_messages,
    with_system_prompt,
)
from engine.chat.prompts import PromptItem, held_out_prompts, prompts_from_file, prompts_from_lines
from engine.chat.ratings import BASE, FINETUNED, BlindSession, RatingView, format_win_rate_cell, win_rate
from engine.chat.sources import (
    LATEST,
    AdapterSource,
    adapter_options,
    resolve_adapter,
    source_for_folder,
    source_for_run,
)
from engine.evals.metrics import token_f1  # the score the Chat tab shows; owned by engine.evals

__all__ = [
    "BASE", "FINETUNED", "LATEST", "SIDES", "AdapterSource", "BlindSession", "ChatModels", "Comparison", "PromptItem",
    "RatingView", "Sampling", "StopSignals", "adapter_options", "clean_messages", "format_win_rate_cell",
    "held_out_prompts", "prompts_from_file", "prompts_from_lines",
    "resolve_adapter", "source_for_folder", "source_for_run", "token_f1", "win_rate", "with_system_prompt",
]
