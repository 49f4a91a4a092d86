"""A conversation cut before its answer: the prompt to send and the reference to score against.

One owner for how a dataset row becomes a prompt, shared by the task evaluation during
training and by the Chat tab's prompt sets (``engine.chat.prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptItem:
    """One prompt: the messages to send (system and earlier turns included), and the reference answer."""

    messages: list[dict]
    reference: str | None = None

    @property
    def text(self) -> str:
        """The last user turn: what the person sees as "the prompt"."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


def prompts_from_rows(rows: list[dict]) -> list[PromptItem]:
    """Cut each ``{"messages": ...}`` row before its last assistant turn; that turn is the reference."""
    items = []
    for row in rows:
        messages = row.get("messages")
        if not messages:
            continue  # plain-text rows have no prompt to answer
        last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_answer is None:
            prompt, reference = list(messages), None
        else:
            prompt, reference = list(messages[:last_answer]), messages[last_answer]["content"]
        if any(m["role"] == "user" for m in prompt):
            items.append(PromptItem([dict(role=m["role"], content=m["content"]) for m in prompt], reference))
    return items
