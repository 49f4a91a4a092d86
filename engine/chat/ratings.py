"""Blind A/B ratings: turning a person's judgement into a recorded result.

Each compared prompt is shown as answers A and B in random order; the person's pick is
appended to the run's ``ratings.jsonl`` together with everything needed to audit it later
(prompt, both answers, which side was which, sampling settings, adapter, time).
The win rate is the share of ratings in which the fine-tuned answer was preferred; ties
and "both bad" count as ratings that were not wins.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import RunError
from engine.training.rundir import RunPaths, append_jsonl, read_jsonl

BASE, FINETUNED = "base", "finetuned"
CHOICES = ("A", "B", "tie", "both_bad")
CHOICE_ALIASES = {"a": "A", "b": "B", "tie": "tie", "both bad": "both_bad", "both_bad": "both_bad", "bad": "both_bad"}


@dataclass
class BlindItem:
    """One prompt with its two answers in a hidden order."""

    prompt: str
    answer_a: str
    answer_b: str
    a_side: str  # BASE or FINETUNED: which model wrote answer A
    reference: str | None = None

    @property
    def b_side(self) -> str:
        return BASE if self.a_side == FINETUNED else FINETUNED


def make_blind_items(rows, rng: random.Random | None = None) -> list[BlindItem]:
    """``rows`` have ``prompt``, ``base``, ``finetuned`` (and ``reference``); each gets a coin flip."""
    rng = rng or random.SystemRandom()
    items = []
    for row in rows:
        get = row.get if isinstance(row, dict) else lambda key, row=row: getattr(row, key, None)
        tuned_first = rng.random() < 0.5
        a, b = (get("finetuned"), get("base")) if tuned_first else (get("base"), get("finetuned"))
        items.append(BlindItem(prompt=get("prompt"), answer_a=a or "", answer_b=b or "",
                               a_side=FINETUNED if tuned_first else BASE, reference=get("reference")))
    return items


def normalise_choice(choice: str) -> str:
    normalised = CHOICE_ALIASES.get(str(choice).strip().lower())
    if normalised is None:
        raise RunError(f"'{choice}' is not a rating; choose A, B, tie or both bad.")
    return normalised


def winner_of(item: BlindItem, choice: str) -> str:
    """Unblind a choice: 'finetuned', 'base', 'tie' or 'both_bad'."""
    choice = normalise_choice(choice)
    return {"A": item.a_side, "B": item.b_side}.get(choice, choice)


def record_rating(ratings_path: Path, item: BlindItem, choice: str, sampling: dict | None = None,
                  adapter: str | None = None, base_model: str | None = None, now: float | None = None) -> dict:
    """Append one rating and return the record written."""
    choice = normalise_choice(choice)
    record = {
        "time": time.time() if now is None else now,
        "prompt": item.prompt,
        "answer_a": item.answer_a,
        "answer_b": item.answer_b,
        "a_side": item.a_side,
        "b_side": item.b_side,
        "choice": choice,
        "winner": winner_of(item, choice),
        "reference": item.reference,
        "adapter": adapter,
        "base_model": base_model,
        "sampling": dict(sampling or {}),
    }
    Path(ratings_path).parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(Path(ratings_path), record)
    return record


def ratings_file(run_dir: str | Path) -> Path:
    """A run's ratings file; an adapter folder outside any run keeps its own."""
    return RunPaths(Path(run_dir)).ratings


def read_ratings(run_dir: str | Path) -> list[dict]:
    records, _ = read_jsonl(ratings_file(run_dir))
    return [r for r in records if r.get("winner") in (BASE, FINETUNED, "tie", "both_bad")]


def win_rate(run_dir: str | Path) -> tuple[float | None, int, int]:
    """(share of ratings preferring the fine-tuned answer, wins, ratings); rate is None with no ratings."""
    ratings = read_ratings(run_dir)
    wins = sum(1 for r in ratings if r["winner"] == FINETUNED)
    return (wins / len(ratings) if ratings else None), wins, len(ratings)


def describe_win_rate(rate: float | None, wins: int, count: int) -> str:
    if not count:
        return "No blind ratings yet."
    tallies = f"{wins} of {count} blind rating{'s' if count != 1 else ''}"
    return f"Fine-tuned answer preferred in {tallies} ({rate:.0%}); ties and 'both bad' are not wins."


def format_win_rate_cell(run_dir: str | Path) -> str:
    """The runs-table cell: '62% (5/8)', or '' without ratings."""
    rate, wins, count = win_rate(run_dir)
    return "" if rate is None else f"{rate:.0%} ({wins}/{count})"


def item_as_dict(item: BlindItem) -> dict:
    return asdict(item)
