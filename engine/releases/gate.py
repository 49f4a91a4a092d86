"""The promotion gate: declared criteria a candidate's eval report must meet to become the release.

The candidate is judged against the current release when there is one (the report must
have been made ``--against`` it, so both sides ran on the same prompts, machine and copy of
the base), else against the base model. Criteria:

* task metric: at least ``min_gain_points`` points (score x 100) above the baseline;
* schema errors: at most ``max_new_schema_errors`` more than the baseline;
* policy violations: at most ``max_new_policy_violations`` more than the baseline;
* latency: p95 time to first token and p95 time per output token each at most
  ``max_latency_increase_pct`` percent above the release's. Judged release against release
  only: the base has no adapter to compute, so "slower than the base" is not news.

A refusal names each failed criterion, by how much, and the items behind it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.errors import ConfigError

MAX_ITEMS_NAMED = 10


@dataclass
class Gate:
    min_gain_points: float = 2.0
    max_new_schema_errors: int = 0
    max_new_policy_violations: int = 0
    max_latency_increase_pct: float = 10.0

    def validated(self) -> Gate:
        for name in ("max_new_schema_errors", "max_new_policy_violations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"gate.{name}", f"must be a whole number >= 0, got {value!r}.")
        if not isinstance(self.min_gain_points, (int, float)) or not -100 <= self.min_gain_points <= 100:
            raise ConfigError("gate.min_gain_points", f"must be from -100 to 100 points, got {self.min_gain_points!r}.")
        if not isinstance(self.max_latency_increase_pct, (int, float)) or self.max_latency_increase_pct < 0:
            raise ConfigError("gate.max_latency_increase_pct",
                              f"must be a percentage >= 0, got {self.max_latency_increase_pct!r}.")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Criterion:
    name: str
    passed: bool
    detail: str
    items: list = field(default_factory=list)

    def sentence(self) -> str:
        shown = self.items[:MAX_ITEMS_NAMED]
        more = f" and {len(self.items) - len(shown)} more" if len(self.items) > len(shown) else ""
        items = f" (items: {', '.join(str(i) for i in shown)}{more})" if self.items else ""
        return f"{self.name} {'passed' if self.passed else 'FAILED'}: {self.detail}{items}"


@dataclass
class Decision:
    passed: bool
    baseline: str  # "release" or "base"
    criteria: list[Criterion]
    forced: bool = False

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]

    def sentence(self) -> str:
        against = "the current release" if self.baseline == "release" else "the base model (no release yet)"
        if self.passed:
            return f"Promotion gate passed against {against}: " + "; ".join(c.sentence() for c in self.criteria) + "."
        head = "Promotion FORCED despite the gate" if self.forced else "Promotion refused"
        return f"{head} against {against}: " + "; ".join(c.sentence() for c in self.failed) + "."

    def as_dict(self) -> dict:
        return {"passed": self.passed, "baseline": self.baseline, "forced": self.forced, "sentence": self.sentence(),
                "criteria": [asdict(c) for c in self.criteria]}


def _pct(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old <= 0:
        return None
    return (new / old - 1) * 100


def decide(report: dict, gate: Gate) -> Decision:
    """Judge the report's ``adapter`` side against its ``release`` side, else its ``base`` side."""
    gate.validated()
    sides = report["sides"]
    baseline = "release" if "release" in sides else "base"
    new, old = sides["adapter"], sides[baseline]
    flips = report["flips"]["adapter_vs_release" if baseline == "release" else "adapter_vs_base"]
    criteria = []

    gain = (new["score"] - old["score"]) * 100 * (1 if report.get("higher_is_better", True) else -1)
    criteria.append(Criterion(
        "task metric", gain >= gate.min_gain_points,
        f"{report['metric']} {new['score']:.3f} vs {old['score']:.3f} = {gain:+.1f} points, required "
        f"{gate.min_gain_points:+.1f} ({len(flips['improved'])} items improved, {len(flips['regressed'])} "
        f"regressed, {gate.min_gain_points - gain:.1f} points short)" if gain < gate.min_gain_points else
        f"{report['metric']} {new['score']:.3f} vs {old['score']:.3f} = {gain:+.1f} points, required "
        f"{gate.min_gain_points:+.1f}", [] if gain >= gate.min_gain_points else flips["regressed"]))

    if new["schema_errors"] is not None:
        added = new["schema_errors"] - (old["schema_errors"] or 0)
        fresh = sorted(set(new["schema_error_items"]) - set(old["schema_error_items"]))
        ok = added <= gate.max_new_schema_errors
        criteria.append(Criterion(
            "schema errors", ok, f"{new['schema_errors']} vs {old['schema_errors']} ({added:+d}, allowed "
            f"{gate.max_new_schema_errors:+d}" + ("" if ok else f", {added - gate.max_new_schema_errors} over") + ")",
            [] if ok else fresh))

    added = new["policy_violations"] - old["policy_violations"]
    seen = {(v["item"], v["check"], v["detail"]) for v in old["violations"]}
    fresh = [("refusal: " + v["detail"]) if v["item"] is None else f"{v['item']} ({v['check']})"
             for v in new["violations"] if (v["item"], v["check"], v["detail"]) not in seen]
    ok = added <= gate.max_new_policy_violations
    criteria.append(Criterion(
        "policy violations", ok, f"{new['policy_violations']} vs {old['policy_violations']} ({added:+d}, allowed "
        f"{gate.max_new_policy_violations:+d}" + ("" if ok else f", {added - gate.max_new_policy_violations} over")
        + ")", [] if ok else fresh))

    if baseline == "release":
        worst, parts = 0.0, []
        for key, label in (("ttft_p95_s", "p95 time to first token"), ("per_token_p95_s", "p95 time per token")):
            change = _pct(new["latency"].get(key), old["latency"].get(key))
            if change is not None:
                worst = max(worst, change)
                parts.append(f"{label} {new['latency'][key] * 1000:.2f} ms vs {old['latency'][key] * 1000:.2f} ms "
                             f"({change:+.1f}%)")
        ok = worst <= gate.max_latency_increase_pct
        slow = []
        if not ok:
            limit = old["latency"].get("per_token_p95_s") or 0
            slow = [row["index"] for row in report["items"]
                    if (row.get("latency") or {}).get("adapter", {}).get("per_token_s", 0) > limit]
        criteria.append(Criterion(
            "latency", ok, "; ".join(parts) + f", allowed +{gate.max_latency_increase_pct:g}%"
            + ("" if ok else f", {worst - gate.max_latency_increase_pct:.1f} points over"), slow))
    else:
        criteria.append(Criterion("latency", True, "not judged against the base model (it computes no adapter); "
                                                   "judged from the second release on"))
    return Decision(passed=all(c.passed for c in criteria), baseline=baseline, criteria=criteria)
