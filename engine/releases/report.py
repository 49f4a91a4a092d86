"""The eval report: base, fine-tuned adapter and (optionally) the current release, on one copy of the base.

``python -m engine eval RUN [--prompts FILE] [--against RELEASE] [--policy FILE]`` answers a
private eval set (the run's held-out split, or a file with references) with every side,
greedily and one request at a time, and writes ``RUN/eval/report.json`` and
``RUN/eval/report.html``. It scores:

* the run's task metric (``engine.evals`` owns the metrics), the share of valid JSON, and
  schema errors (answers failing ``eval.schema_path``, or not JSON at all for a JSON task);
* the declared policy (``engine.evals.policy``): forbidden phrases and regexes, a maximum
  length, prompts that must be refused;
* latency: time to first token, tokens per second, time per output token (p50 and p95).

The report lists per-item flips (adapter vs base, and adapter vs release), the failure
cases with every side's answer, and the blind A/B win rate from the Chat tab's ratings.

One base in memory: the run's adapter and the release's adapter are two PEFT adapters on
one model, and the base answers inside ``disable_adapter()``, as ``engine.chat`` does. The
sides take turns item by item (base, adapter, release, then the next item) so a slowdown
of a shared machine hits every side alike and the latency comparison stays fair.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.errors import ConfigError, RunError
from engine.releases.files import read_report, report_dir, report_path
from engine.training import rundir

__all__ = ["make_report", "read_report", "report_dir", "report_path", "summary_line", "write_report"]

BASE, ADAPTER, RELEASE = "base", "adapter", "release"
JSON_METRICS = ("json_equal", "valid_json", "json_schema")
REPORT_VERSION = 1


def _prompt_items(run_dir: Path, config, prompts_file, limit):
    from engine.evals import prompts_from_rows

    if prompts_file:
        from engine.chat.prompts import prompts_from_file

        items, source = prompts_from_file(prompts_file), str(Path(prompts_file).expanduser())
    else:
        from engine.training.task_eval import held_out_rows

        items, source = prompts_from_rows(held_out_rows(config)), "held-out split of the run"
    if not items:
        raise RunError(f"There are no prompts to evaluate in {source}.")
    return (items[:limit] if limit else items), source


def _schema_check(config, metric: str):
    """(what a schema error is, function answer -> bool error) or (None, None) when the task is not structured."""
    from engine.evals.metrics import build_options, json_schema_valid, valid_json

    if config.eval.schema_path:
        options = build_options("json_schema", config.eval.schema_path)
        what = f"not valid against {config.eval.schema_path}"
        return what, lambda answer: not json_schema_valid(answer, None, options)
    if metric in JSON_METRICS or config.eval.metric in JSON_METRICS:
        return "not JSON", lambda answer: not valid_json(answer)
    return None, None


def _latency(records: list[dict]) -> dict:
    from engine.evals.compare import percentile

    ttft = [r["ttft_s"] for r in records]
    per_token = [r["total_s"] / r["tokens"] for r in records if r["tokens"]]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    rounded = lambda value, digits=5: None if value is None else round(value, digits)
    return {"ttft_p50_s": rounded(percentile(ttft, 50)), "ttft_p95_s": rounded(percentile(ttft, 95)),
            "per_token_p50_s": rounded(percentile(per_token, 50)),
            "per_token_p95_s": rounded(percentile(per_token, 95)),
            "tokens_per_s_p50": rounded(percentile(rates, 50), 2), "requests": len(records),
            "tokens": sum(r["tokens"] for r in records)}


def make_report(run_dir: Path, prompts_file: str | Path | None = None, against: str | None = None,
                releases_dir: Path = Path("releases"), policy_file: str | Path | None = None,
                limit: int | None = None, metric: str | None = None, adapter: str = "adapter", log=print) -> dict:
    """Answer, score and write ``eval/report.json`` and ``eval/report.html`` in the run; returns the report."""
    from engine.evals import build_options, check_references, get_metric
    from engine.evals.compare import flips
    from engine.evals.generate import generate_timed
    from engine.evals.policy import load_policy
    from engine.training.task_eval import load_run_model, run_adapter_dir

    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    adapter_dir = run_adapter_dir(run_dir, adapter)
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be a whole number >= 1, got {limit}.")
    metric = metric or (config.eval.metric if config.eval.metric != "none" else "token_f1")
    get_metric(metric)
    options = build_options(metric, config.eval.schema_path, config.eval.pattern)
    items, source = _prompt_items(run_dir, config, prompts_file, limit)
    check_references(metric, [item.reference for item in items], where="eval prompt")
    default_policy = report_dir(run_dir) / "policy.yaml"
    policy = load_policy(policy_file or (default_policy if default_policy.is_file() else None))
    schema_what, schema_error = _schema_check(config, metric)

    release = None
    if against:
        from engine.releases.store import check_same_base, resolve_version

        release = resolve_version(releases_dir, against, "current")
        check_same_base(release, run_dir)

    log(f"Loading the base of run '{run_dir.name}' once, with its adapter"
        + (f" and release {release.label}'s adapter" if release else "") + ".")
    model, tokenizer = load_run_model(config, adapter_dir, adapter_name=ADAPTER)
    sides = [BASE, ADAPTER]
    if release:
        model.load_adapter(str(release.adapter_dir), adapter_name=RELEASE)
        sides.append(RELEASE)
    max_new = config.eval.max_new_tokens

    def answer(side: str, messages: list[dict]) -> dict:
        if side == BASE:
            with model.disable_adapter():
                return generate_timed(model, tokenizer, messages, max_new)
        model.set_adapter(side)
        return generate_timed(model, tokenizer, messages, max_new)

    started = time.time()
    records = {side: [] for side in sides}
    for number, item in enumerate(items, start=1):
        for side in sides:  # take turns item by item: a busy machine slows every side alike
            records[side].append(answer(side, item.messages))
        if number % 10 == 0 or number == len(items):
            log(f"answered {number}/{len(items)} prompts with {', '.join(sides)}")
    refusals = []
    for prompt in policy.must_refuse:
        messages = [{"role": "user", "content": prompt}]
        answers = {side: answer(side, messages)["answer"] for side in sides}
        refusals.append({"prompt": prompt, "answers": answers,
                         "refused": {side: policy.refused(text) for side, text in answers.items()}})

    spec = get_metric(metric)
    report_sides, rows = {}, []
    for side in sides:
        answers = [r["answer"] for r in records[side]]
        scores = [spec(a, item.reference, options) for a, item in zip(answers, items)]
        violations = [{"item": i, **v} for i, a in enumerate(answers) for v in policy.violations(a)]
        violations += [{"item": None, "check": "must_refuse", "detail": r["prompt"]} for r in refusals
                       if not r["refused"][side]]
        schema_items = [i for i, a in enumerate(answers) if schema_error and schema_error(a)]
        report_sides[side] = {
            "score": round(sum(scores) / len(scores), 6), "scores": scores,
            "valid_json": round(sum(1.0 for a in answers if _is_json(a)) / len(answers), 6),
            "schema_errors": len(schema_items) if schema_error else None, "schema_error_items": schema_items,
            "policy_violations": len(violations), "violations": violations, "latency": _latency(records[side])}
    if release:
        report_sides[RELEASE].update(name=release.name, version=release.version, path=str(release.path))
    for index, item in enumerate(items):
        rows.append({"index": index, "prompt": item.text, "messages": item.messages, "reference": item.reference,
                     "answers": {side: records[side][index]["answer"] for side in sides},
                     "scores": {side: report_sides[side]["scores"][index] for side in sides},
                     "latency": {side: {"ttft_s": round(records[side][index]["ttft_s"], 5),
                                        "per_token_s": round(records[side][index]["total_s"]
                                                             / max(records[side][index]["tokens"], 1), 5)}
                                 for side in sides}})
    comparisons = {"adapter_vs_base": flips(report_sides[ADAPTER]["scores"], report_sides[BASE]["scores"])}
    if release:
        comparisons["adapter_vs_release"] = flips(report_sides[ADAPTER]["scores"], report_sides[RELEASE]["scores"])
    best = 1.0 if spec.higher_is_better else 0.0
    failures = [i for i, s in enumerate(report_sides[ADAPTER]["scores"]) if s != best]
    from engine.chat.ratings import win_rate_record
    from engine.lineage import file_sha256

    weights = next((adapter_dir / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_dir / f).is_file()), None)
    report = {
        "version": REPORT_VERSION, "run": run_dir.name, "run_path": str(run_dir.resolve()),
        "adapter": {"path": str(adapter_dir), "weights_sha256": file_sha256(weights)[0] if weights else None},
        "base_model": config.model.name_or_path, "created_at": time.time(),
        "seconds": round(time.time() - started, 2), "prompts_source": source, "n": len(items),
        "metric": metric, "metric_description": spec.description, "higher_is_better": spec.higher_is_better,
        "schema_errors_are": schema_what, "generation": {"do_sample": False, "max_new_tokens": max_new},
        "policy": policy.as_dict(), "against": ({"name": release.name, "version": release.version}
                                                if release else None),
        "sides": report_sides, "flips": comparisons, "failures": failures, "refusals": refusals, "items": rows,
        "ratings": win_rate_record(run_dir),
    }
    write_report(run_dir, report)
    log(summary_line(report))
    return report


def _is_json(answer: str) -> bool:
    from engine.evals.metrics import valid_json

    return bool(valid_json(answer))


def write_report(run_dir: Path, report: dict) -> None:
    from engine.releases.html import render_report_html

    folder = report_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(folder / "report.json", report)
    rundir.write_text_atomic(folder / "report.html", render_report_html(report))


def summary_line(report: dict) -> str:
    sides = report["sides"]
    parts = [f"{side} {data['score']:.3f}" for side, data in sides.items()]
    flip = report["flips"]["adapter_vs_base"]
    text = (f"{report['run']}: {report['metric']} on {report['n']} prompts: {', '.join(parts)}; adapter vs base: "
            f"{len(flip['improved'])} improved, {len(flip['regressed'])} regressed, {len(flip['unchanged'])} "
            f"unchanged; policy violations: "
            + ", ".join(f"{side} {data['policy_violations']}" for side, data in sides.items()))
    if "adapter_vs_release" in report["flips"]:
        flip = report["flips"]["adapter_vs_release"]
        text += (f"; adapter vs release: {len(flip['improved'])} improved, {len(flip['regressed'])} regressed, "
                 f"{len(flip['unchanged'])} unchanged")
    return text + "."
