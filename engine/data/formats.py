"""Dataset formats: detect which layout a record uses and normalise it to chat messages.

Every supported layout becomes ``{"messages": [{"role", "content"}, ...]}`` with roles
``system`` / ``user`` / ``assistant``, because the worker trains with TRL's conversational
path (``assistant_only_loss``) on exactly that shape. Plain ``text`` rows, for continued
pre-training, stay ``{"text": ...}``.

Why hand-written rather than ``trl.data_utils.maybe_convert_to_chatml``: that helper only
covers ShareGPT's from/value keys; we also need Alpaca, prompt/completion, column
mapping and, above all, messages that say which fields were expected and which were found.
"""

from __future__ import annotations

import json
import re
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
FORMAT_CHOICES = ("auto", *FORMATS)  # what a person may choose: detection, or one format

# The fields each format reads: (required, optional). Also the keys a column map may rename.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}

# Keys inside one message that a column map may rename too (e.g. {"role": "speaker"}).
MESSAGE_KEYS = ("role", "content", "from", "value")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "ai": "assistant",
}


WEIGHT_NOTE = (
    "Some turns carry a 'weight' key (OpenAI fine-tuning layout); weights are ignored and every assistant "
    "turn is trained on."
)


_MISSING = object()


class RowError(ValueError):
    """A record that does not fit its format; the reader adds the file and line."""


def describe_fields(fmt: str) -> str:
    required, optional = FORMAT_FIELDS[fmt]
    text = ", ".join(required)
    if optional:
        text += f" (optional: {', '.join(optional)})"
    return text


def _printable(name: Any, limit: int = 40) -> str:
    """A field name safe to print: escaped if not valid Unicode, shortened if long."""
    text = str(name).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _found(record: Any) -> str:
    if isinstance(record, dict):
        return ", ".join(_printable(k) for k in list(record)[:20]) or "no fields"
    return f"a JSON {type(record).__name__} instead of an object"


def apply_column_map(record: dict, column_map: dict[str, str] | None) -> dict:
    """Rename the user's columns to the names a format expects (``{expected: actual}``)."""
    if not column_map:
        return record
    renamed = dict(record)
    for expected, actual in column_map.items():
        if expected in MESSAGE_KEYS:
            continue  # applied inside each message
        if actual in record:
            renamed[expected] = record[actual]
    return renamed


def detect_format(record: Any) -> str:
    """The format a (column-mapped) record is in, judged by its field names."""
    if not isinstance(record, dict):
        raise RowError(f"Each row must be a JSON object with named fields, but this one is {_found(record)}.")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    expected = "; ".join(f"{name}: {describe_fields(name)}" for name in FORMATS)
    raise RowError(
        f"Could not detect the dataset format from the fields found ({_found(record)}). Expected one of {expected}. "
        "Choose the format by hand and map your column names to these fields."
    )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _as_text(value: Any, what: str) -> str:
    """Content as a string: scalars are stringified, OpenAI-style content parts joined."""
    if isinstance(value, str):
        # JSON may escape half of a UTF-16 pair ("\ud800"); no tokenizer can encode that.
        if _SURROGATE.search(value):
            raise RowError(f"{what} contains an invalid Unicode escape (a lone surrogate).")
        return value
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RowError(f"{what} has a part of type '{part.get('type')}'; only text parts are supported.")
            texts.append(_as_text(part["text"], what))
        return "".join(texts)
    raise RowError(f"{what} must be text, but it is a JSON {type(value).__name__}.")


def _maybe_json_list(value: Any) -> Any:
    """CSV cells and some exports hold a conversation as a JSON string: decode it."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(decoded, list):
            return decoded
    return value


def _normalise_role(raw: Any, where: str) -> str:
    role = ROLE_ALIASES.get(str(raw).strip().lower()) if isinstance(raw, str) else None
    if role is None:
        raise RowError(
            f"{where} has the role {_printable(repr(raw))}; supported roles are system, user and assistant "
            "(also human/gpt from ShareGPT). Tool and function turns are not supported."
        )
    return role


def _normalise_messages(
    value: Any,
    fmt: str,
    role_key: str,
    content_key: str,
    column_map: dict[str, str] | None,
    notes: set[str] | None = None,
    field: str | None = None,
) -> list[dict]:
    field = field or ("messages" if fmt == "messages" else "conversations")
    value = _maybe_json_list(value)
    if not isinstance(value, list) or not value:
        raise RowError(
            f"The '{field}' field must be a non-empty list of turns ({role_key}/{content_key}), "
            f"but it is {_describe_value(value)}."
        )
    role_key = (column_map or {}).get(role_key, role_key)
    content_key = (column_map or {}).get(content_key, content_key)
    messages = []
    for index, turn in enumerate(value, start=1):
        where = f"Turn {index} of '{field}'"
        if not isinstance(turn, dict):
            raise RowError(
                f"{where} must be an object with {role_key}/{content_key}, but it is {_describe_value(turn)}."
            )
        # ShareGPT files in the wild mix both key styles; accept either in each format.
        role_raw = turn.get(role_key, turn.get("role", turn.get("from")))
        if content_key in turn:
            content_raw = turn[content_key]
        else:
            content_raw = turn.get("content", turn.get("value", _MISSING))
        if role_raw is None or content_raw is _MISSING:
            raise RowError(
                f"{where} does not fit the {fmt} format: expected the fields {role_key} and {content_key}; "
                f"found {_found(turn)}."
            )
        if "weight" in turn and notes is not None:
            notes.add(WEIGHT_NOTE)
        if turn.get("tool_calls"):
            raise RowError(f"{where} has tool_calls; tool and function turns are not supported.")
        messages.append({"role": _normalise_role(role_raw, where), "content": _as_text(content_raw, where)})
    return messages



def _describe_value(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    if value is None:
        return "empty (null)"
    return f"a JSON {type(value).__name__}"


def _require(record: dict, fmt: str) -> None:
    required, _ = FORMAT_FIELDS[fmt]
    missing = [name for name in required if name not in record]
    if missing:
        raise RowError(
            f"This row does not fit the {fmt} format: expected the fields {describe_fields(fmt)}; "
            f"found {_found(record)} (missing: {', '.join(missing)})."
        )


def _require_assistant(messages: list[dict]) -> None:
    # TRL raises mid-training on a conversation with no assistant tokens under
    # assistant_only_loss; catching it here names the file and line instead.
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("This conversation has no assistant turn, so nothing in it would be trained on.")


def normalise_record(
    record: Any, fmt: str, column_map: dict[str, str] | None = None, notes: set[str] | None = None
) -> dict:
    """One record of format ``fmt`` as a ``messages`` row (or a ``text`` row).

    ``notes`` collects remarks worth one warning for the whole dataset (not an error).
    """
    if fmt not in FORMATS:
        raise RowError(f"Unknown format '{fmt}'; choose one of {', '.join(FORMAT_CHOICES)}.")
    if not isinstance(record, dict):
        raise RowError(f"Each row must be a JSON object with named fields, but this one is {_found(record)}.")
    record = apply_column_map(record, column_map)
    _require(record, fmt)

    if fmt == "text":
        return {"text": _as_text(record["text"], "The 'text' field")}

    if fmt == "messages":
        messages = _normalise_messages(record["messages"], fmt, "role", "content", column_map, notes)
    elif fmt == "sharegpt":
        messages = _normalise_messages(record["conversations"], fmt, "from", "value", column_map, notes)
        system = record.get("system")
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": _as_text(system, "The 'system' field")})
    elif fmt == "alpaca":
        instruction = _as_text(record["instruction"], "The 'instruction' field")
        extra = _as_text(record.get("input"), "The 'input' field")
        # Instruction and input joined by a blank line, the way Alpaca's own prompt separates them.
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _as_text(record["system"], "The 'system' field")})
        for pair in record.get("history") or []:  # LLaMA-Factory's earlier [question, answer] turns
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise RowError("The 'history' field must be a list of [question, answer] pairs.")
            messages.append({"role": "user", "content": _as_text(pair[0], "A 'history' question")})
            messages.append({"role": "assistant", "content": _as_text(pair[1], "A 'history' answer")})
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _as_text(record["output"], "The 'output' field")})
    else:  # prompt_completion, plain strings or TRL's conversational prompt/completion lists
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _as_text(record["system"], "The 'system' field")})
        for name, role in (("prompt", "user"), ("completion", "assistant")):
            value = _maybe_json_list(record[name])
            if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
                messages.extend(_normalise_messages(value, "messages", "role", "content", None, notes, name))
            else:
                messages.append({"role": role, "content": _as_text(value, f"The '{name}' field")})
    _require_assistant(messages)
    return {"messages": messages}


def row_is_empty(row: dict) -> bool:
    """No visible text at all (every turn blank, or blank text)."""
    if "text" in row:
        return not row["text"].strip()
    return all(not m["content"].strip() for m in row["messages"])
