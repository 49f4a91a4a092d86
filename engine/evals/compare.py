"""Comparing two sides of an eval item by item: flips, and the percentiles latency is judged by.

An aggregate score can hide a trade: +3 points may be 10 items fixed and 7 broken. The
report and the promotion gate read these per-item flips, so a regression is named by item.
"""

from __future__ import annotations

import math

FLIPS = ("improved", "regressed", "unchanged")


def flips(candidate: list[float], baseline: list[float]) -> dict[str, list[int]]:
    """Item indices where ``candidate`` scored above, below or the same as ``baseline``."""
    if len(candidate) != len(baseline):
        raise ValueError(f"the two sides scored {len(candidate)} and {len(baseline)} items; they must be the same")
    result = {name: [] for name in FLIPS}
    for index, (new, old) in enumerate(zip(candidate, baseline)):
        result["improved" if new > old else "regressed" if new < old else "unchanged"].append(index)
    return result


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation, numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
