"""Task metrics during training: at every evaluation, answer held-out prompts and score them.

Eval loss says the model got likelier to produce the references; it does not say the
answers are right (a model can learn the JSON format and still fill in the wrong words).
So at each evaluation — the base before step 0 (with ``eval_on_start``), every
``eval_steps`` and the final one — the model answers a fixed subset of held-out prompts
greedily and a metric from ``engine.evals`` scores them. Each result is one line of
metrics.jsonl::

    {"event": "task_eval", "step", "metric", "score", "n", "valid_json", "seconds", "t", "examples"}

and status.json gets ``task_metric``, ``task_score`` (latest) and ``baseline_task_score``.

A transformers ``TrainerCallback`` (``on_evaluate``), so it runs inside the Trainer's own
evaluation schedule, for LoRA, QLoRA and full fine-tuning alike, and after a resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError
from engine.evals import build_options, check_references, prompts_from_rows, score_answers
from engine.evals.generate import generate_greedy
from engine.training import rundir

EXAMPLES_LOGGED = 3  # a few answers per evaluation, so a person can see what the score means


@dataclass
class TaskEvalPlan:
    """What to generate and how to score it, settled (and checked) before training starts."""

    metric: str
    options: dict
    conversations: list[list[dict]]
    references: list[str | None]
    max_new_tokens: int
    batch_size: int
    notes: list[str] = field(default_factory=list)

    def length_note(self, tokenizer) -> str | None:
        """A sentence when references are longer than ``eval.max_new_tokens``: their answers would be cut short and
        could never match, so a score of 0 would look like a model that learned nothing."""
        lengths = [len(tokenizer(reference, add_special_tokens=False)["input_ids"])
                   for reference in self.references if reference]
        longer = [length for length in lengths if length > self.max_new_tokens]
        if not longer:
            return None
        return (f"eval.max_new_tokens is {self.max_new_tokens}, but {len(longer)} of the {len(lengths)} scored "
                f"references are longer (up to {max(longer)} tokens): those answers are cut short and cannot "
                f"match. Raise eval.max_new_tokens to at least {max(longer)}.")

    def run(self, model, tokenizer) -> dict:
        started = time.time()
        answers = generate_greedy(model, tokenizer, self.conversations, self.max_new_tokens, self.batch_size)
        scores = score_answers(self.metric, answers, self.references, self.options)
        return {"metric": self.metric, "score": round(scores.score, 6), "n": scores.n,
                "valid_json": round(scores.valid_json, 6), "seconds": round(time.time() - started, 3),
                "examples": [{"answer": a, "reference": r, "score": s}
                             for a, r, s in zip(answers[:EXAMPLES_LOGGED], self.references, scores.items)]}


def plan_task_eval(config, eval_rows) -> TaskEvalPlan | None:
    """The run's task evaluation, or None when ``eval.metric`` is none; ConfigError in words when it cannot work.

    Called when the run starts, before the model is loaded: a reference the metric cannot
    read (its row named) or held-out rows without prompts stop the run here, not mid-run.
    """
    settings = config.eval
    if settings.metric == "none":
        return None
    if not eval_rows:
        raise ConfigError("eval.metric", "a task metric needs held-out rows, and this run has none: set "
                                         "data.eval_path or data.eval_fraction, or set eval.metric to none.")
    wanted = settings.num_samples
    if hasattr(eval_rows, "select"):  # a datasets.Dataset: convert only the rows scored
        eval_rows = eval_rows.select(range(min(len(eval_rows), wanted))).to_list()
    items = prompts_from_rows(list(eval_rows)[:wanted])
    if not items:
        raise ConfigError("eval.metric", "the held-out rows are plain text: there is no prompt to answer and score. "
                                         "Set eval.metric to none for continued pre-training.")
    options = build_options(settings.metric, settings.schema_path, settings.pattern)
    check_references(settings.metric, [item.reference for item in items])
    notes = []
    if len(items) < wanted:
        notes.append(f"eval.num_samples is {wanted}, but there are only {len(items)} held-out prompts: "
                     f"scoring all {len(items)}.")
    return TaskEvalPlan(metric=settings.metric, options=options, conversations=[i.messages for i in items],
                        references=[i.reference for i in items], max_new_tokens=settings.max_new_tokens,
                        batch_size=config.train.per_device_eval_batch_size, notes=notes)


def make_task_eval_callback(run_dir: Path, plan: TaskEvalPlan, log=print):
    """The TrainerCallback that runs ``plan`` at every evaluation and records the result in the run directory."""
    from transformers import TrainerCallback

    paths = rundir.RunPaths(Path(run_dir))

    class TaskEvalCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
            if model is None or processing_class is None:
                return
            rundir.update_status(run_dir, "evaluating",
                                 message=f"Scoring answers to {len(plan.conversations)} held-out prompts "
                                         f"({plan.metric}).")
            result = plan.run(model, processing_class)
            record = {"event": "task_eval", "step": state.global_step, "t": time.time(), **result}
            rundir.append_jsonl(paths.metrics, record)
            metrics = kwargs.get("metrics")
            if isinstance(metrics, dict):  # the evaluation's own metrics: early stopping and the best model read it
                metrics["eval_task_score"] = result["score"]
            fields = {"task_metric": plan.metric, "task_score": result["score"]}
            if state.global_step == 0:
                fields["baseline_task_score"] = result["score"]
            rundir.update_status(run_dir, **fields)
            log(f"task eval at step {state.global_step}: {plan.metric} {result['score']:.3f} on {result['n']} "
                f"prompts ({result['seconds']:.1f} s)")

    return TaskEvalCallback()


# ----------------------------------------------------------------------------- after training
def held_out_rows(config) -> list:
    """The run's held-out rows, split exactly as the worker split them."""
    from engine.data.load import load_dataset_rows, split_rows

    data = config.data
    if data.eval_path:
        return load_dataset_rows(data.eval_path, fmt=data.format, skip_bad=data.skip_bad_rows,
                                 split="eval" if data.eval_path == "demo" else "train").rows
    return split_rows(load_dataset_rows(data.path, fmt=data.format, skip_bad=data.skip_bad_rows).rows,
                      data.eval_fraction, config.train.seed)[1]


def run_adapter_dir(run_dir: Path, adapter: str = "adapter") -> Path:
    """The final adapter or ``checkpoint-N`` of a run; RunError in words when it has none there."""
    from engine.errors import RunError

    run_dir = Path(run_dir)
    adapter_dir = run_dir / adapter if adapter == "adapter" else rundir.RunPaths(run_dir).checkpoints / adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RunError(f"Run '{run_dir.name}' has no adapter at {adapter_dir} yet: nothing to evaluate.")
    return adapter_dir


def load_run_model(config, adapter_dir: Path, adapter_name: str = "default"):
    """The run's base, loaded as the run trained it (4-bit for QLoRA), wrapped in PEFT with ``adapter_dir``.

    One copy of the base: further adapters are added with ``model.load_adapter`` and the base
    answers inside ``model.disable_adapter()``. Returns (model, tokenizer saved with the adapter).
    """
    import torch  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.config.build import decide_runtime, model_load_kwargs
    from engine.hub import resolve_model

    runtime = decide_runtime(config)
    kwargs = model_load_kwargs(config, runtime, training=False)
    kwargs.pop("attn_implementation", None)
    base_path = resolve_model(config.model.name_or_path, what="base model")
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(runtime.device)
    model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def evaluate_run(run_dir: Path, metric: str | None = None, limit: int | None = None, adapter: str = "adapter",
                 log=print) -> dict:
    """Score a finished run's adapter and its base on the held-out prompts (``python -m engine evaluate``).

    The same plan, generation and metric as during training, on as many prompts as asked
    (all by default), the base loaded as the run trained it (4-bit for QLoRA). The base is
    the same model with the adapter switched off, so the two scores differ by the adapter only.
    ``python -m engine eval`` (``engine.releases.report``) builds the full report from the same pieces.
    """
    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    adapter_dir = run_adapter_dir(run_dir, adapter)
    if metric:
        config.eval.metric = metric
    if config.eval.metric == "none":
        config.eval.metric = "exact_match"
    rows = held_out_rows(config)
    config.eval.num_samples = limit or len(rows)
    plan = plan_task_eval(config, rows)
    model, tokenizer = load_run_model(config, adapter_dir)
    finetuned = plan.run(model, tokenizer)
    with model.disable_adapter():
        base = plan.run(model, tokenizer)
    log(f"{run_dir.name}: {plan.metric} on {finetuned['n']} held-out prompts: base {base['score']:.3f}, "
        f"fine-tuned {finetuned['score']:.3f} (valid JSON: base {base['valid_json']:.3f}, fine-tuned "
        f"{finetuned['valid_json']:.3f}; {base['seconds'] + finetuned['seconds']:.1f} s)")
    return {"metric": plan.metric, "n": finetuned["n"], "base": base, "finetuned": finetuned}
