"""What a sweep found: one row per run, the Pareto front, and one sentence that recommends a run.

``read_results`` reads the runs' directories (through ``engine.training.rundir``, their one
reader); everything else here is a pure function of those rows, so the CLI, the Sweeps tab
and the tests compute the same front and the same sentence.

Quality is the run's final eval loss (the loss of the adapter it saved; lower is better):
the thing a person keeps. Costs are the measured peak memory and the wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.training import rundir
from engine.training.overfit import evaluations

NEAR_BEST = 0.01  # "within 1% of the best eval loss" is as good, for choosing


@dataclass
class RunResult:
    name: str
    label: str  # "r=8"
    values: dict[str, str]
    status: str = "unknown"
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    task_metric: str | None = None
    task_score: float | None = None
    peak_memory_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    tokens_per_second: float | None = None
    wall_time_s: float | None = None
    adapter_bytes: int | None = None
    overfit: str = ""  # the overfitting alarm's cell, if raised
    kept_step: int | None = None  # early stopping kept this step's checkpoint
    metrics: list = field(default_factory=list, repr=False)  # for the overlaid curves

    def row(self) -> dict:
        mib = lambda value: None if value is None else round(value / 2**20)
        rounded = lambda value, digits=4: None if value is None else round(value, digits)
        return {
            "run": self.name, "value": self.label, "status": self.status,
            "final eval loss": rounded(self.final_eval_loss), "best eval loss": rounded(self.best_eval_loss),
            "best step": self.best_step,
            "task score": None if self.task_score is None else f"{self.task_metric} {self.task_score:.3f}",
            "peak memory (MiB)": mib(self.peak_memory_bytes), "predicted peak (MiB)": mib(self.predicted_peak_bytes),
            "tokens/s": rounded(self.tokens_per_second, 1), "wall time (s)": rounded(self.wall_time_s, 1),
            "adapter (MiB)": None if self.adapter_bytes is None else round(self.adapter_bytes / 2**20, 2),
            "overfitting": self.overfit,
        }


COLUMNS = list(RunResult(name="", label="", values={}).row())


def _folder_bytes(folder: Path) -> int | None:
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
    except OSError:
        return None
    return sum(p.stat().st_size for p in files) if files else None


def read_result(run_dir: Path, entry: dict) -> RunResult:
    """One run's row, from its directory (never raises: a damaged or missing run reads as such)."""
    run_dir = Path(run_dir)
    values = entry.get("values") or {}
    result = RunResult(name=run_dir.name, label=entry.get("label") or run_dir.name, values=values,
                       predicted_peak_bytes=entry.get("predicted_peak_bytes"))
    if not run_dir.is_dir():
        result.status = "missing"
        return result
    summary = rundir.summarize_run(run_dir, cached=True)
    metrics = rundir.read_metrics(run_dir)
    losses = evaluations(metrics, "eval_loss")
    result.status = summary.state
    result.metrics = metrics
    if losses:
        result.final_eval_loss = losses[-1][1]
        best = min(losses, key=lambda item: item[1])
        result.best_step, result.best_eval_loss = best[0], best[1]
    result.task_metric, result.task_score = summary.task_metric, summary.task_score
    result.peak_memory_bytes = summary.peak_memory_bytes
    speeds = [m["tokens_per_second"] for m in metrics if isinstance(m.get("tokens_per_second"), (int, float))]
    result.tokens_per_second = sum(speeds) / len(speeds) if speeds else None
    result.wall_time_s = summary.duration_s
    result.adapter_bytes = _folder_bytes(rundir.RunPaths(run_dir).adapter)
    result.overfit = summary.overfit.cell if summary.overfit is not None else ""
    result.kept_step = rundir.read_run_status(run_dir).kept_step
    return result


def read_results(sweep: dict, runs_dir: Path) -> list[RunResult]:
    from engine.sweeps.store import run_dirs

    return [read_result(run_dir, entry) for entry, run_dir in run_dirs(sweep, runs_dir)]


# ----------------------------------------------------------------------------- pure: the front and the sentence
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(results: list[RunResult], cost: str = "peak_memory_bytes",
                 quality: str = "final_eval_loss") -> list[RunResult]:
    """The non-dominated runs on (quality, cost), both lower-is-better, in order of cost.

    A run is dominated when another is no worse on both and better on one. Runs missing
    either number are left out (not finished, or no evaluation).
    """
    known = [r for r in results if _number(getattr(r, quality)) and _number(getattr(r, cost))]

    def dominates(a: RunResult, b: RunResult) -> bool:
        qa, qb, ca, cb = getattr(a, quality), getattr(b, quality), getattr(a, cost), getattr(b, cost)
        return qa <= qb and ca <= cb and (qa < qb or ca < cb)

    front = [r for r in known if not any(dominates(other, r) for other in known if other is not r)]
    return sorted(front, key=lambda r: (getattr(r, cost), getattr(r, quality)))


def recommendation(results: list[RunResult], tolerance: float = NEAR_BEST) -> str:
    """One sentence: the cheapest run within ``tolerance`` of the best final eval loss, and why.

    Cheapest in peak memory first; when no near-best run saves memory, in wall time. A cost
    counts only when every near-best run has it measured.
    """
    scored = [r for r in results if _number(r.final_eval_loss)]
    if not scored:
        return "No run has an eval loss yet: nothing to recommend."
    best = min(scored, key=lambda r: r.final_eval_loss)
    near = [r for r in scored if r.final_eval_loss <= best.final_eval_loss * (1 + tolerance)]
    measured = [(cost, what) for cost, what in (("peak_memory_bytes", "memory"), ("wall_time_s", "wall time"))
                if all(_number(getattr(r, cost)) for r in near)]
    if not measured:
        return (f"{best.label} has the best eval loss ({best.final_eval_loss:.4f}); its costs are not measured, "
                "so nothing cheaper can be recommended.")
    for cost, what in measured:
        choice = min(near, key=lambda r: (getattr(r, cost), r.final_eval_loss))
        if choice is not best and getattr(best, cost):
            gap = choice.final_eval_loss / best.final_eval_loss - 1 if best.final_eval_loss else 0.0
            saving = 1 - getattr(choice, cost) / getattr(best, cost)
            return (f"{choice.label} is within {max(gap, 0):.1%} of the best eval loss ({choice.final_eval_loss:.4f} "
                    f"against {best.final_eval_loss:.4f} for {best.label}) at {saving:.0%} less {what} than "
                    f"{best.label}.")
    others = len(scored) - 1
    whats = " or ".join(what for _, what in measured)
    return (f"{best.label} has the best eval loss ({best.final_eval_loss:.4f}), and no run within {tolerance:.0%} "
            f"of it uses less {whats}"
            + (f" ({others} other run{'s' if others != 1 else ''} compared)." if others else "."))
