"""Greedy answers for a list of conversations, batched with left padding.

Used by the task evaluation during training (``engine.evals.callback``) and by
``python -m engine evaluate``. Greedy decoding, because a score that changes with the
sampling seed cannot tell whether a run improved.
"""

from __future__ import annotations


def encode_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text up to the start of the answer (the chat template's generation prompt)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # A base without a chat template: the same plain transcript the Chat tab sends.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                    batch_size: int = 32) -> list[str]:
    """One greedy answer per conversation, in order.

    Left padding, because a decoder-only model continues from the last position of each
    row: with right padding the shorter prompts would continue after pad tokens. The
    model is put in eval mode (no dropout) under ``torch.no_grad`` and restored after, so
    this can run in the middle of training.
    """
    import torch

    was_training = model.training
    side = tokenizer.padding_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            for start in range(0, len(conversations), batch_size):
                texts = [encode_prompt(tokenizer, m) for m in conversations[start:start + batch_size]]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                output = model.generate(**batch, do_sample=False, temperature=None, top_p=None, top_k=None,
                                        max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True)
                new_tokens = output[:, batch["input_ids"].shape[1]:]
                answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return answers


def generate_timed(model, tokenizer, messages: list[dict], max_new_tokens: int) -> dict:
    """One greedy answer, unbatched, with its latency: time to first token and tokens per second.

    Unbatched on purpose: latency is a per-request figure (a batch's first token waits for its
    longest prompt), and the promotion gate compares per-item percentiles. The first token's
    time is taken by a ``StoppingCriteria``, which ``generate`` calls once after every new token.
    """
    import time

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    batch = tokenizer(encode_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        started = time.perf_counter()
        output = model.generate(**batch, do_sample=False, temperature=None, top_p=None, top_k=None,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                                stopping_criteria=StoppingCriteriaList([Stamp()]))
        ended = time.perf_counter()
    new_tokens = output[0, batch["input_ids"].shape[1]:]
    count = int(new_tokens.shape[0])
    first = (stamps[0] - started) if stamps else ended - started
    decode_s = ended - (stamps[0] if stamps else started)
    return {"answer": tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), "tokens": count,
            "ttft_s": first, "total_s": ended - started,
            "tokens_per_s": (count - 1) / decode_s if count > 1 and decode_s > 0 else None}
