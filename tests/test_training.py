"""Real training on the CPU through the worker process: LoRA and QLoRA targets, metrics, lineage, adapters."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.demo import demo_dataset_path
from engine.training import rundir
from engine.training.task_eval import evaluate_run
from tests.conftest import run_preset_to_end

pytestmark = pytest.mark.slow  # every test here trains the demo model (once per session for demo-lora)


def _eval_losses(run_dir):
    return [(m["step"], m["eval_loss"]) for m in rundir.read_metrics(run_dir) if m.get("event") == "eval"]


def test_demo_lora_cuts_held_out_loss_by_at_least_30_percent(demo_lora_run):
    status = rundir.read_status(demo_lora_run)
    assert status["state"] == "completed", rundir.log_tail(demo_lora_run)
    evals = _eval_losses(demo_lora_run)
    assert evals[0][0] == 0, "the base model's held-out loss is measured before the first step"
    baseline, final = evals[0][1], evals[-1][1]
    assert status["baseline_eval_loss"] == baseline
    print(f"demo-lora: base eval loss {baseline:.4f} -> {final:.4f} ({100 * (1 - final / baseline):.1f}% lower), "
          f"{status['ended_at'] - status['started_at']:.0f} s")
    assert final <= 0.7 * baseline
    assert evals[-1][0] == status["step"] == status["max_steps"]


def _task_evals(run_dir):
    return [m for m in rundir.read_metrics(run_dir) if m.get("event") == "task_eval"]


def test_demo_lora_learns_the_task_not_only_the_format(demo_lora_run):
    """Greedy answers on all 200 held-out prompts: the base almost never right, the adapter almost always."""
    result = evaluate_run(demo_lora_run)
    base, tuned = result["base"], result["finetuned"]
    print(f"demo-lora, json_equal on {result['n']} held-out prompts: base {base['score']:.3f}, "
          f"fine-tuned {tuned['score']:.3f}; e.g. {tuned['examples'][0]['answer']}")
    assert result["metric"] == "json_equal" and result["n"] == 200
    assert base["score"] <= 0.10
    assert tuned["score"] >= 0.90, f"e.g. {tuned['examples'][:2]}"


def test_demo_qlora_learns_the_task_on_a_4bit_base(demo_model_dir, session_runs_dir):
    """The same target for QLoRA (NF4 base through bitsandbytes on the CPU), a little lower: the 4-bit base copies
    less exactly."""
    run_dir = run_preset_to_end(session_runs_dir, "demo-qlora", name="demo-qlora-session")
    result = evaluate_run(run_dir)
    base, tuned = result["base"], result["finetuned"]
    print(f"demo-qlora, json_equal on {result['n']} held-out prompts: base {base['score']:.3f}, "
          f"fine-tuned {tuned['score']:.3f}; {rundir.read_status(run_dir)['train_runtime_s']:.0f} s of training")
    assert rundir.read_status(run_dir)["state"] == "completed" and result["n"] == 200
    assert base["score"] <= 0.10 and tuned["score"] >= 0.85, f"e.g. {tuned['examples'][:2]}"


def test_task_metric_is_logged_at_every_evaluation_from_the_base_on(demo_lora_run):
    status = rundir.read_status(demo_lora_run)
    task, evals = _task_evals(demo_lora_run), _eval_losses(demo_lora_run)
    assert [m["step"] for m in task] == [step for step, _ in evals], "one task score beside each eval loss"
    assert task[0]["step"] == 0 and status["baseline_task_score"] == task[0]["score"] <= 0.10
    assert status["task_metric"] == "json_equal" and status["task_score"] == task[-1]["score"]
    assert all(m["n"] == 50 and m["metric"] == "json_equal" and 0 <= m["score"] <= 1 for m in task)
    assert task[-1]["valid_json"] > task[0]["valid_json"] and len(task[-1]["examples"]) == 3  # the format is learned
    share = sum(m["seconds"] for m in task) / status["train_runtime_s"]
    print(f"task evaluation: {sum(m['seconds'] for m in task):.1f} s of {status['train_runtime_s']:.0f} s training "
          f"({100 * share:.1f}%)")
    assert share < 0.10
    summary = rundir.summarize_run(demo_lora_run)
    assert summary.as_row()["task score"] == f"json_equal {task[-1]['score']:.3f}"


def test_metrics_stream_has_what_the_charts_need(demo_lora_run):
    metrics = rundir.read_metrics(demo_lora_run)
    logs = [m for m in metrics if m["event"] == "log"]
    assert len(logs) >= 10 and len(_eval_losses(demo_lora_run)) >= 3
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", "eta_s", "t"):
        assert all(key in m for m in logs[1:]), key
    steps = [m["step"] for m in logs]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    first, last = logs[:3], logs[-3:]
    assert sum(m["loss"] for m in last) / 3 < 0.5 * sum(m["loss"] for m in first) / 3
    assert all(m["tokens_per_second"] > 0 for m in logs[1:])
    assert logs[-1]["eta_s"] < logs[1]["eta_s"]


def test_adapter_and_lineage_are_saved(demo_lora_run):
    paths = rundir.RunPaths(demo_lora_run)
    assert (paths.adapter / "adapter_config.json").exists()
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert (paths.adapter / "tokenizer.json").exists()
    adapter_config = json.loads((paths.adapter / "adapter_config.json").read_text())
    from engine.config import load_preset

    lora = load_preset("demo-lora").lora
    assert adapter_config["r"] == lora.r and adapter_config["lora_alpha"] == lora.lora_alpha
    lineage = json.loads(paths.lineage.read_text())
    expected = hashlib.sha256(demo_dataset_path("train").read_bytes()).hexdigest()
    assert lineage["data"]["train"]["sha256"] == expected
    assert lineage["data"]["train"]["num_rows"] == 1200
    assert lineage["data"]["eval"]["num_rows"] == 200
    assert len(lineage["base_model"]["content_sha256"]) == 64
    assert lineage["software"]["packages"]["trl"]
    status = rundir.read_status(demo_lora_run)
    assert any("CUDA" in sentence for sentence in status["fallbacks"]), "running on the CPU is said, not silent"
    assert 0 < status["trainable_parameters"] < status["total_parameters"]


def test_demo_qlora_trains_real_4bit_layers(demo_model_dir, session_runs_dir):
    run_dir = run_preset_to_end(session_runs_dir, "demo-qlora", name="demo-qlora-session")
    status = rundir.read_status(run_dir)
    assert status["state"] == "completed", rundir.log_tail(run_dir)
    assert status["linear4bit_layers"] == 4 * 7, "every linear layer of the 4 blocks is bitsandbytes Linear4bit"
    evals = _eval_losses(run_dir)
    baseline, final = evals[0][1], evals[-1][1]
    print(f"demo-qlora: base eval loss {baseline:.4f} -> {final:.4f} ({100 * (1 - final / baseline):.1f}% lower)")
    # Looser than LoRA's 30%: the baseline is the NF4-quantized base, and the adapter
    # learns against 4-bit rounding noise; 25% still means the format was learned.
    assert final <= 0.75 * baseline
    assert any("No CUDA" in s for s in status["fallbacks"]), "QLoRA on the CPU is said, not silent"
    # The task metric works on the 4-bit base too, during training and after it.
    assert _task_evals(run_dir)[0]["step"] == 0 and status["task_score"] is not None
    result = evaluate_run(run_dir)
    print(f"demo-qlora, json_equal on {result['n']} held-out prompts: base {result['base']['score']:.3f}, "
          f"fine-tuned {result['finetuned']['score']:.3f}")
    assert result["n"] == 200 and result["base"]["score"] <= 0.10
    if result["finetuned"]["score"] < 0.85:  # issue 11 part 1, as for demo-lora
        pytest.xfail(f"demo-qlora target not reached: {result['finetuned']['score']:.3f} < 0.85")
