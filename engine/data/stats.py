"""Token statistics and warnings over a whole dataset, optionally in a background thread.

Counts are kept as running totals plus one integer per row (its token length), so a
pass over a large file holds little beyond the histogram's input. Exact duplicates are
found by a 16-byte digest per distinct row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

from engine.data.preview import TemplateInfo, encode_row, training_template
from engine.errors import LoraLabError

# The seeds' rule of thumb: "Minimum: 500-1000 high-quality examples".
MIN_EXAMPLES = 500
TRUNCATION_WARNING_FRACTION = 0.05


DIGEST_SIZE = 16


def row_digest(row: dict) -> bytes:
    """Identity of a normalised row for exact-duplicate counting."""
    return hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=DIGEST_SIZE).digest()


@dataclass
class TokenStats:
    """Figures the Dataset tab and ``python -m engine data inspect`` show."""

    rows: int = 0
    empty_rows: int = 0
    duplicate_rows: int = 0
    tokenized: bool = False  # False when no tokenizer/template could render the rows
    total_tokens: int = 0  # before truncation
    trained_tokens: int = 0  # contributing to the loss, after truncation
    max_tokens: int = 0
    truncated_rows: int = 0
    tokens_lost: int = 0
    no_trainable_rows: int = 0  # dropped by the trainer: nothing left to learn from
    unrenderable_rows: int = 0
    max_length: int | None = None
    lengths: list[int] = field(default_factory=list, repr=False)
    first_render_error: str | None = None

    @property
    def mean_tokens(self) -> float:
        return self.total_tokens / len(self.lengths) if self.lengths else 0.0

    def figures(self) -> dict:
        """Everything but the per-row lengths, for JSON output and the figures table."""
        data = asdict(self)
        data.pop("lengths")
        data["mean_tokens"] = round(self.mean_tokens, 2)
        return data


class StatsAccumulator:
    """Adds rows one at a time; ``tokenizer=None`` counts rows, empties and duplicates only."""

    def __init__(self, tokenizer=None, max_length: int | None = None, template: TemplateInfo | None = None):
        self.tokenizer = tokenizer
        self.template = template if template is not None or tokenizer is None else training_template(tokenizer)
        self.stats = TokenStats(max_length=max_length, tokenized=tokenizer is not None)
        self._seen: set[bytes] = set()
        # 16 bytes per row, in row order: lets a fraction split count train/eval overlaps afterwards
        self.digests = bytearray()

    def add(self, row: dict) -> None:
        from engine.data.formats import row_is_empty

        stats = self.stats
        stats.rows += 1
        if row_is_empty(row):
            stats.empty_rows += 1
        digest = row_digest(row)
        self.digests += digest
        if digest in self._seen:
            stats.duplicate_rows += 1
        else:
            self._seen.add(digest)
        if self.tokenizer is None:
            return
        if "messages" in row and self.template.problem:
            stats.tokenized = False
            return
        try:
            encoded = encode_row(self.tokenizer, row, self.template, stats.max_length)
        except LoraLabError as exc:
            stats.unrenderable_rows += 1
            stats.first_render_error = stats.first_render_error or str(exc)
            return
        stats.lengths.append(encoded.length)
        stats.total_tokens += encoded.length
        stats.max_tokens = max(stats.max_tokens, encoded.length)
        stats.trained_tokens += encoded.trained_tokens
        if encoded.truncated:
            stats.truncated_rows += 1
            stats.tokens_lost += encoded.tokens_lost
        if encoded.trained_tokens == 0:
            stats.no_trainable_rows += 1


def compute_token_stats(
    rows: Iterable[dict], tokenizer=None, max_length: int | None = None, template: TemplateInfo | None = None
) -> TokenStats:
    """Statistics over ``rows`` in this thread (``StatsJob`` runs the same in the background)."""
    accumulator = StatsAccumulator(tokenizer, max_length, template)
    for row in rows:
        accumulator.add(row)
    return accumulator.stats


def length_histogram(lengths: list[int], max_bins: int = 40) -> tuple[list[int], list[int]]:
    """(bin left edges, counts) with integer-width bins; the last bin includes its right edge.

    Computed here, not by Plotly in the browser, so the drawn bars are the counted figures.
    """
    if not lengths:
        return [], []
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / max_bins))
    count = math.ceil((high - low + 1) / width)
    counts = [0] * count
    for length in lengths:
        counts[(length - low) // width] += 1
    return [low + i * width for i in range(count)], counts


def steps_per_epoch(train_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch on one device, as ``transformers.Trainer`` counts them."""
    if train_rows <= 0:
        return 0
    batches = math.ceil(train_rows / max(1, batch_size))
    return max(batches // max(1, grad_accum) + int(batches % max(1, grad_accum) > 0), 1)


def cross_duplicates(train_rows: Iterable[dict], eval_rows: Iterable[dict]) -> int:
    """Eval rows that also appear, exactly, in the training rows."""
    seen = {row_digest(row) for row in train_rows}
    return sum(1 for row in eval_rows if row_digest(row) in seen)


def digest_at(digests: bytes | bytearray, index: int) -> bytes:
    return bytes(digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])


def copy_stats(stats: TokenStats) -> TokenStats:
    return replace(stats, lengths=list(stats.lengths))


def dataset_warnings(
    stats: TokenStats,
    template: TemplateInfo | None = None,
    train_rows: int | None = None,
    eval_duplicates: int = 0,
    fmt: str | None = None,
) -> list[str]:
    """The practitioner's checklist, as sentences."""
    found = []
    count = stats.rows if train_rows is None else train_rows
    if count < MIN_EXAMPLES:
        found.append(
            f"Only {count} training examples: the usual minimum is 500-1000 high-quality examples; with fewer, "
            "a fine-tune tends to memorise rather than generalise."
        )
    if template is not None and template.problem and fmt != "text":
        found.append(template.problem)
    if template is not None and fmt != "text":
        found.extend(template.warnings)
    if stats.tokenized and stats.rows and stats.truncated_rows / stats.rows >= TRUNCATION_WARNING_FRACTION:
        share = 100 * stats.truncated_rows / stats.rows
        found.append(
            f"{stats.truncated_rows} rows ({share:.0f}%) are longer than max_length={stats.max_length} and lose "
            f"{stats.tokens_lost} tokens to truncation; raise max_length or shorten them."
        )
    if stats.no_trainable_rows:
        found.append(
            f"{stats.no_trainable_rows} rows have no trained token left after truncation; the trainer drops them."
        )
    if stats.empty_rows:
        found.append(f"{stats.empty_rows} rows are empty (no text in any turn).")
    if stats.duplicate_rows:
        found.append(f"{stats.duplicate_rows} rows are exact duplicates of an earlier row.")
    if eval_duplicates:
        found.append(
            f"{eval_duplicates} eval rows also appear in the training data, so eval loss will look better than it is."
        )
    if stats.unrenderable_rows:
        found.append(f"{stats.unrenderable_rows} rows could not be rendered; the first: {stats.first_render_error}")
    return found
