"""Prompt sets for batch comparison: a run's held-out split, a file, or typed lines.

Every source becomes a list of ``PromptItem``: the conversation up to the answer, and the
reference answer when the data has one. Files with answers go through ``engine.data.load``
(the loader the worker trains with, so every training format works here too); files of
bare prompts, which that loader rightly refuses for training, are read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import DataError, LoraLabError
from engine.evals.prompts import PromptItem, prompts_from_rows

PLAIN_TEXT_SUFFIXES = {".txt", ".md", ".text", ""}
PROMPT_KEYS = ("prompt", "question", "instruction", "input", "text")
REFERENCE_KEYS = ("completion", "answer", "reference", "output", "response")


def prompts_from_lines(text: str) -> list[PromptItem]:
    """One prompt per non-empty line, no reference."""
    return [PromptItem([{"role": "user", "content": line.strip()}]) for line in (text or "").splitlines()
            if line.strip()]


def _bare_prompt_record(record, path: str, line: int) -> PromptItem:
    """A JSON line without an answer: {"prompt": ...}, {"messages": [user turns]} or a bare string."""
    if isinstance(record, str) and record.strip():
        return PromptItem([{"role": "user", "content": record.strip()}])
    if isinstance(record, dict):
        messages = record.get("messages") or record.get("conversations")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            from engine.data.formats import normalise_record

            has_answer = any(isinstance(m, dict) and m.get("role") in ("assistant", "gpt") for m in messages)
            placeholder = [] if has_answer else [{"role": "assistant", "content": ""}]
            try:  # the loader's role and key normalisation, with a placeholder answer when there is none
                found = prompts_from_rows([normalise_record({"messages": messages + placeholder}, "messages")])
            except ValueError as error:
                raise DataError(str(error), path, line) from None
            if found:
                reference = found[0].reference if has_answer else next(
                    (record[k] for k in REFERENCE_KEYS if isinstance(record.get(k), str)), None)
                return PromptItem(found[0].messages, reference)
        for key in PROMPT_KEYS:
            if isinstance(record.get(key), str) and record[key].strip():
                text = record[key]
                if key == "instruction" and isinstance(record.get("input"), str) and record["input"].strip():
                    text = f"{text}\n\n{record['input']}"  # joined as engine.data.formats joins Alpaca rows
                reference = next((record[k] for k in REFERENCE_KEYS if isinstance(record.get(k), str)), None)
                messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
                return PromptItem(messages + [{"role": "user", "content": text}], reference)
    raise DataError(
        f"No prompt found: expected a 'messages' list or one of the fields {', '.join(PROMPT_KEYS)}; "
        f"found {json.dumps(record)[:120]}.", path, line)


def _bare_prompts_jsonl(path: Path) -> list[PromptItem]:
    items = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON ({error.msg}).", str(path), number) from None
            items.append(_bare_prompt_record(record, str(path), number))
    return items


def prompts_from_file(path: str | Path) -> list[PromptItem]:
    """A .txt file (one prompt per line), or any dataset file ``engine.data.load`` reads, with or without answers."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError("No such prompts file.", str(path))
    if path.is_file() and path.suffix.lower() in PLAIN_TEXT_SUFFIXES:
        head = path.read_text(encoding="utf-8-sig", errors="replace")
        if not head.lstrip().startswith(("{", "[")):
            items = prompts_from_lines(head)
            if not items:
                raise DataError("The prompts file has no non-empty line.", str(path))
            return items
    from engine.data.load import load_dataset_rows

    try:
        items = prompts_from_rows(load_dataset_rows(str(path)).rows)
    except LoraLabError as error:
        # The training loader refuses rows without an answer; a prompt set may have none.
        if path.suffix.lower() not in (".jsonl", ".ndjson", ".json") or path.is_dir():
            raise
        if path.suffix.lower() == ".json":
            try:
                document = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError:
                raise error from None
            if not isinstance(document, list):
                raise error from None
            items = [_bare_prompt_record(record, str(path), None) for record in document]
        else:  # its error names the first line that has no prompt at all
            items = _bare_prompts_jsonl(path)
    if not items:
        raise DataError("No prompts found (every row was plain text without a user turn).", str(path))
    return items


def held_out_prompts(run_dir: str | Path) -> list[PromptItem]:
    """The run's evaluation rows, split exactly as the worker split them."""
    from engine.data.load import load_dataset_rows, split_rows
    from engine.training.rundir import load_config

    config = load_config(Path(run_dir))
    data = config.data
    if data.eval_path:
        split = "eval" if data.eval_path == "demo" else "train"
        rows = load_dataset_rows(data.eval_path, fmt=data.format, skip_bad=data.skip_bad_rows, split=split).rows
    elif data.eval_fraction > 0:
        rows = load_dataset_rows(data.path, fmt=data.format, skip_bad=data.skip_bad_rows).rows
        rows = split_rows(rows, data.eval_fraction, config.train.seed)[1]
    else:
        raise DataError(f"Run '{Path(run_dir).name}' has no held-out split (data.eval_path is empty and "
                        "data.eval_fraction is 0); give a prompts file or typed prompts instead.")
    items = prompts_from_rows(rows)
    if not items:
        raise DataError(f"The held-out rows of run '{Path(run_dir).name}' are plain text: there is no prompt "
                        "to answer.")
    return items
