"""Task metrics: score a model's greedy answers to held-out prompts, not only its loss.

``metrics`` holds the metric functions and their registry (``METRICS``), the checks that
refuse bad options and references in words, and ``score_answers``; ``prompts`` cuts
dataset rows into prompt and reference; ``generate`` makes greedy answers in batches. The
training loop's callback (``engine.training.task_eval``) and ``python -m engine evaluate``
are built from these. This package imports nothing else of the engine but ``errors``, so
the config schema can read the metric names.
"""

from engine.evals.metrics import (
    METRIC_CHOICES,
    METRICS,
    Metric,
    Scores,
    build_options,
    check_references,
    get_metric,
    load_schema,
    option_problems,
    parse_json,
    score_answers,
    token_f1,
)
from engine.evals.prompts import PromptItem, prompts_from_rows

__all__ = [
    "METRICS", "METRIC_CHOICES", "Metric", "PromptItem", "Scores", "build_options", "check_references", "get_metric",
    "load_schema", "option_problems", "parse_json", "prompts_from_rows", "score_answers", "token_f1",
]
