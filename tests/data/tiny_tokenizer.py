"""A tiny byte-level BPE tokenizer with a ChatML template, built in well under a second.

Tests use it instead of the demo model, whose first build pretrains for about a minute.
"""

from __future__ import annotations

from pathlib import Path

from engine.demo import CHAT_TEMPLATE as CHATML_WITH_GENERATION  # the demo model's template: one definition

CORPUS = [
    "Extract as JSON: the big red ball is on the table.",
    "The capital of France is Paris. What is two plus two? It is four.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Translate to French: good morning. Bonjour. Summarise the text below.",
    '{"object": "ball", "color": "red", "place": "table"}',
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer(chat_template: str | None = CHATML_WITH_GENERATION):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", model_max_length=4096
    )
    fast.chat_template = chat_template
    return fast


def save_tiny_tokenizer(folder: Path, chat_template: str | None = CHATML_WITH_GENERATION) -> Path:
    build_tiny_tokenizer(chat_template).save_pretrained(folder)
    return folder
