"""The overfitting alarm: the held-out metric got worse while the training loss kept falling.

A pure function of a run's metrics records (metrics.jsonl, as ``rundir.read_metrics`` gives
them), so the runs table, the Train tab, the sweep table and the tests all read the same
verdict from the same files, live or after the fact. It watches what early stopping watches
(``train.early_stopping_metric`` and its direction): eval loss, or the task score of
``engine.training.task_eval``.

The rule: the metric worsened at ``patience`` consecutive evaluations (each one worse than
the one before, and than the best so far) while the mean training loss logged over those
evaluations' steps fell. The alarm names the step where the worsening began and the best
evaluation so far, with its checkpoint when one was saved at that step. A later new best
clears it: the run recovered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_PATIENCE = 3  # evaluations; the run's train.early_stopping_patience when it sets one


@dataclass
class OverfitAlarm:
    metric: str  # "eval_loss" or the task metric's name
    began_step: int  # the first evaluation that was worse than the best
    last_step: int  # the latest evaluation
    worsened: int  # consecutive worse evaluations up to last_step
    best_step: int
    best_value: float
    last_value: float
    train_loss_before: float
    train_loss_after: float
    best_checkpoint: str | None = None  # checkpoint-N at the best step, when it was saved

    @property
    def sentence(self) -> str:
        kept = (f"the best so far is step {self.best_step} ({self.metric} {self.best_value:.4f}), "
                + (f"saved as {self.best_checkpoint}" if self.best_checkpoint else "not saved as a checkpoint"))
        return (f"Overfitting: {self.metric} worsened for {self.worsened} evaluations from step {self.began_step} "
                f"({self.best_value:.4f} -> {self.last_value:.4f}) while the training loss kept falling "
                f"({self.train_loss_before:.4f} -> {self.train_loss_after:.4f}); {kept}.")

    @property
    def cell(self) -> str:
        """Short, for a table cell."""
        return f"from step {self.began_step} (best {self.best_step})"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def evaluations(records: list[dict], metric: str = "eval_loss") -> list[tuple[int, float, str]]:
    """(step, value, name) of each evaluation after training began (step 0 is the base model's baseline)."""
    found = []
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or step <= 0:
            continue
        if metric == "eval_loss" and _number(record.get("eval_loss")):
            found.append((step, float(record["eval_loss"]), "eval_loss"))
        elif metric == "task_score" and record.get("event") == "task_eval" and _number(record.get("score")):
            found.append((step, float(record["score"]), str(record.get("metric") or "task score")))
    return found


def _mean_train_loss(records: list[dict], after: int, upto: int) -> float | None:
    losses = [float(r["loss"]) for r in records
              if isinstance(r.get("step"), int) and after < r["step"] <= upto and _number(r.get("loss"))]
    return sum(losses) / len(losses) if losses else None


def overfit_alarm(records: list[dict], patience: int = DEFAULT_PATIENCE, metric: str = "eval_loss",
                  greater_is_better: bool = False, checkpoint_steps: list[int] | None = None) -> OverfitAlarm | None:
    """The alarm for this metrics stream, or None. See the module docstring for the rule."""
    patience = max(1, int(patience))
    evals = evaluations(records, metric)
    better = (lambda a, b: a > b) if greater_is_better else (lambda a, b: a < b)
    best_index, streak, alarm = None, 0, None
    for index, (step, value, name) in enumerate(evals):
        if best_index is None or better(value, evals[best_index][1]):
            best_index, streak, alarm = index, 0, None  # a new best: whatever alarm there was has cleared
            continue
        previous = evals[index - 1][1]
        streak = streak + 1 if better(previous, value) else 0
        if streak < patience:
            alarm = None
            continue
        began = index - streak + 1
        before_from = evals[began - 2][0] if began >= 2 else 0
        before = _mean_train_loss(records, before_from, evals[began - 1][0])
        after = _mean_train_loss(records, evals[index - 1][0], step)
        if before is None or after is None or not after < before:
            alarm = None  # the training loss did not fall: not overfitting (perhaps a diverging run)
            continue
        best_step, best_value, _ = evals[best_index]
        alarm = OverfitAlarm(metric=name, began_step=evals[began][0], last_step=step, worsened=streak,
                             best_step=best_step, best_value=best_value, last_value=value,
                             train_loss_before=before, train_loss_after=after,
                             best_checkpoint=f"checkpoint-{best_step}"
                             if best_step in (checkpoint_steps or ()) else None)
    return alarm


def alarm_settings(config: dict) -> tuple[int, str, bool]:
    """(patience, metric, greater_is_better) of a run's config mapping; the defaults when it is damaged."""
    from engine.config import RunConfig
    from engine.errors import LoraLabError

    try:
        run_config = RunConfig.from_dict(config)
    except (LoraLabError, TypeError, ValueError, AttributeError):
        return DEFAULT_PATIENCE, "eval_loss", False
    train = run_config.train
    patience = train.early_stopping_patience
    patience = patience if isinstance(patience, int) and not isinstance(patience, bool) and patience > 0 \
        else DEFAULT_PATIENCE
    return patience, train.early_stopping_metric, run_config.early_stopping_greater_is_better
