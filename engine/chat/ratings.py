"""Blind A/B ratings: turning a person's judgement into a recorded result.

Each compared prompt is shown as answers A and B in random order; the person's pick is
appended to the run's ``ratings.jsonl`` together with everything needed to audit it later
(prompt, both answers, which side was which, sampling settings, adapter, time).
The win rate is the share of ratings in which the fine-tuned answer was preferred; ties
and "both bad" count as ratings that were not wins. When the left side was another adapter
(a release's previous version) instead of the base, the record names it (``against``) and
its ratings are tallied apart: a win over the previous version is not a win over the base.

``BlindSession`` is the rating state machine the Chat tab drives (next unrated item, rate,
what the panel shows); ``blind`` is the one place answers become A and B, ``winner_of`` the
one place a choice is unblinded.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
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


def blind(row, a_side: str) -> BlindItem:
    """The one place answers become A and B: ``row`` has ``prompt``, ``base``, ``finetuned`` (and ``reference``)."""
    if a_side not in (BASE, FINETUNED):
        raise RunError(f"'{a_side}' is not a side; it is '{BASE}' or '{FINETUNED}'.")
    get = row.get if isinstance(row, dict) else lambda key, row=row: getattr(row, key, None)
    a, b = (get("finetuned"), get("base")) if a_side == FINETUNED else (get("base"), get("finetuned"))
    return BlindItem(prompt=get("prompt"), answer_a=a or "", answer_b=b or "", a_side=a_side,
                     reference=get("reference"))


def coin_flip(rng: random.Random | None = None) -> str:
    """Which side shows as A; ``SystemRandom`` by default so a person cannot learn the order from a seed."""
    return FINETUNED if (rng or random.SystemRandom()).random() < 0.5 else BASE


def make_blind_items(rows, rng: random.Random | None = None) -> list[BlindItem]:
    """``rows`` have ``prompt``, ``base``, ``finetuned`` (and ``reference``); each gets a coin flip."""
    rng = rng or random.SystemRandom()
    return [blind(row, coin_flip(rng)) for row in rows]


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
                  adapter: str | None = None, base_model: str | None = None, now: float | None = None,
                  against: str | None = None) -> dict:
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
    if against:
        record["against"] = against  # the adapter that answered on the "base" side
    Path(ratings_path).parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(Path(ratings_path), record)
    return record


def ratings_file(run_dir: str | Path) -> Path:
    """A run's ratings file; an adapter folder outside any run keeps its own."""
    return RunPaths(Path(run_dir)).ratings


def read_ratings(run_dir: str | Path, against: str | None = None) -> list[dict]:
    """The ratings against the base (``against=None``) or against that other adapter."""
    records, _ = read_jsonl(ratings_file(run_dir))
    return [r for r in records if isinstance(r, dict) and r.get("winner") in (BASE, FINETUNED, "tie", "both_bad")
            and r.get("against") == (str(against) if against else None)]


def win_rate(run_dir: str | Path, against: str | None = None) -> tuple[float | None, int, int]:
    """(share of ratings preferring the fine-tuned answer, wins, ratings); rate is None with no ratings."""
    ratings = read_ratings(run_dir, against)
    wins = sum(1 for r in ratings if r["winner"] == FINETUNED)
    return (wins / len(ratings) if ratings else None), wins, len(ratings)


def win_rate_record(run_dir: str | Path, against: str | None = None) -> dict:
    """The win rate as stored in an export's lineage and printed by ``compare --json``."""
    rate, wins, count = win_rate(run_dir, against)
    return {"win_rate": rate, "wins": wins, "count": count}


def describe_win_rate(rate: float | None, wins: int, count: int, over: str | None = None) -> str:
    """The tally in words; ``over`` names the left side when it was an adapter rather than the base."""
    if not count:
        return "No blind ratings yet." if not over else f"No blind ratings against {over} yet."
    tallies = f"{wins} of {count} blind rating{'s' if count != 1 else ''}"
    who = "Fine-tuned answer preferred" if not over else f"Right side preferred over {over}"
    return f"{who} in {tallies} ({rate:.0%}); ties and 'both bad' are not wins."


def format_win_rate_cell(run_dir: str | Path) -> str:
    """The runs-table cell: '62% (5/8)', or '' without ratings."""
    rate, wins, count = win_rate(run_dir)
    return "" if rate is None else f"{rate:.0%} ({wins}/{count})"



# ----------------------------------------------------------------------------- a batch being rated
@dataclass
class RatingView:
    """What the rating panel shows: the next item to rate (None when there is none) and the tally."""

    visible: bool
    item: BlindItem | None
    position: int  # 1-based place of ``item`` in the batch; 0 without an item
    total: int
    rated: int
    all_rated: bool
    win_rate: str  # describe_win_rate of everything recorded for this adapter so far


@dataclass
class BlindSession:
    """A batch comparison being rated blind, one prompt at a time, in the order it was answered.

    Each answered row keeps its hidden side (``a_side``) from the moment it is added, so the
    table, the rating panel and the recorded rating always show the same A and B. The
    session lives in the browser session's state; ratings go to the adapter's run folder.
    """

    ratings_dir: str  # the run folder (or adapter folder) whose ratings.jsonl records the choices
    adapter: str
    base_model: str | None
    label: str
    sampling: dict
    against: str | None = None  # the left side's adapter folder; None: the base with the adapter off
    against_label: str | None = None
    rows: list[dict] = field(default_factory=list)  # Comparison.as_dict() plus "a_side"
    rated: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, source, sampling: dict, against=None) -> BlindSession:
        """An empty session for answers of ``source`` (an ``engine.chat.sources.AdapterSource``) beside the base,
        or beside ``against`` (another AdapterSource of the same base)."""
        return cls(ratings_dir=str(source.ratings_dir), adapter=str(source.path), base_model=source.base_model,
                   label=source.label, sampling=dict(sampling), against=str(against.path) if against else None,
                   against_label=against.label if against else None)

    def describe_win_rate(self) -> str:
        return describe_win_rate(*win_rate(self.ratings_dir, self.against), over=self.against_label)

    def add(self, row: dict, rng: random.Random | None = None) -> dict:
        """Append an answered row with a fresh coin flip for its order; returns the stored row."""
        record = dict(row, a_side=coin_flip(rng))
        self.rows.append(record)
        self.rated.append(False)
        return record

    def item(self, index: int) -> BlindItem:
        return blind(self.rows[index], self.rows[index]["a_side"])

    def next_unrated(self) -> int | None:
        return next((i for i, rated in enumerate(self.rated) if not rated), None)

    def rate(self, choice: str, now: float | None = None) -> dict | None:
        """Record ``choice`` for the next unrated row; None (nothing recorded) once every row is rated."""
        choice = normalise_choice(choice)  # a bad choice is refused before anything moves on
        index = self.next_unrated()
        if index is None:
            return None
        record = record_rating(ratings_file(self.ratings_dir), self.item(index), choice, sampling=self.sampling,
                               adapter=self.adapter, base_model=self.base_model, now=now, against=self.against)
        self.rated[index] = True
        return record

    def view(self, blind_mode: bool = True) -> RatingView:
        """The panel: hidden outside blind mode and before any row exists; the next unrated row otherwise."""
        rate_text = self.describe_win_rate()
        index = self.next_unrated() if blind_mode else None
        common = dict(total=len(self.rows), rated=sum(self.rated), win_rate=rate_text)
        if index is None:
            done = blind_mode and bool(self.rows)
            return RatingView(visible=done, item=None, position=0, all_rated=done, **common)
        return RatingView(visible=True, item=self.item(index), position=index + 1, all_rated=False, **common)
