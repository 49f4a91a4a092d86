"""Task metrics: each metric, bad references and bad schemas refused in words, and the config section."""

from __future__ import annotations

import json

import pytest

from engine.config import RunConfig, field_spec, load_preset
from engine.errors import ConfigError
from engine.evals import (
    METRICS,
    build_options,
    check_references,
    get_metric,
    load_schema,
    option_problems,
    prompts_from_rows,
    score_answers,
)
from engine.evals.metrics import contains, exact_match, json_equal, regex_match, token_f1, valid_json

REFERENCE = '{"object": "cup", "size": "big", "color": "black", "relation": "on", "place": "school"}'


# ----------------------------------------------------------------------------- each metric
def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match("  yes\n", "yes") == 1.0
    assert exact_match("Yes", "yes") == 0.0
    assert exact_match("yes please", "yes") == 0.0


def test_json_equal_ignores_key_order_and_spacing_but_not_values():
    reordered = '{"size":"big","object":"cup","color":"black","relation":"on","place":"school"}'
    assert json_equal(reordered, REFERENCE) == 1.0
    assert json_equal(f"```json\n{REFERENCE}\n```", REFERENCE) == 1.0  # a fenced answer is unwrapped
    assert json_equal(REFERENCE.replace("cup", "hat"), REFERENCE) == 0.0
    assert json_equal(REFERENCE[:-1], REFERENCE) == 0.0  # truncated: not JSON, scored 0, no exception
    assert json_equal("", REFERENCE) == 0.0
    assert json_equal("1.0", "1") == 1.0  # JSON numbers compare as numbers


def test_valid_json_needs_no_reference():
    assert valid_json('{"a": [1, 2]}') == 1.0
    assert valid_json('{"a": [1, 2]') == 0.0
    assert valid_json("plain words") == 0.0


def test_contains_and_regex():
    assert contains("The answer is Paris, of course.", "paris") == 1.0
    assert contains("The answer is Rome.", "Paris") == 0.0
    options = build_options("regex", pattern=r"^\{.*\}$")
    assert regex_match(REFERENCE, None, options) == 1.0
    assert regex_match(f"Sure! {REFERENCE}", None, options) == 0.0


def test_token_f1_scores_overlap_with_punctuation():
    assert token_f1('{"a": "b"}', '{"a": "b"}') == 1.0
    assert token_f1("nothing shared", "at all") == 0.0
    partial = token_f1('{"size": "big"}', '{"size": "small"}')
    assert 0.5 < partial < 1


def test_json_schema_metric(tmp_path):
    schema = tmp_path / "scene.schema.json"
    schema.write_text(json.dumps({
        "type": "object", "required": ["object", "place"], "additionalProperties": {"type": "string"},
        "properties": {"relation": {"enum": ["on", "under", "near", "behind", "inside"]}},
    }))
    options = build_options("json_schema", schema_path=str(schema))
    metric = get_metric("json_schema")
    assert metric(REFERENCE, None, options) == 1.0
    assert metric(REFERENCE.replace('"on"', '"above"'), None, options) == 0.0  # not in the enum
    assert metric('{"object": "cup"}', None, options) == 0.0  # place is required
    assert metric("not json", None, options) == 0.0


def test_every_metric_is_registered_with_a_description_and_a_direction():
    assert set(METRICS) == {"exact_match", "json_equal", "valid_json", "json_schema", "contains", "regex", "token_f1"}
    for metric in METRICS.values():
        assert metric.description and metric.higher_is_better is True
        value = metric(REFERENCE, REFERENCE, {"schema": {"type": "object"}, "pattern": "cup"})
        assert value == 1.0, metric.name  # the reference itself is a perfect answer for every metric
        assert metric("", REFERENCE, {"schema": {"type": "object"}, "pattern": "cup"}) == 0.0, metric.name


def test_score_answers_averages_and_counts_valid_json():
    scores = score_answers("json_equal", [REFERENCE, REFERENCE.replace("cup", "hat"), "oops"], [REFERENCE] * 3)
    assert scores.items == [1.0, 0.0, 0.0] and scores.n == 3
    assert scores.score == pytest.approx(1 / 3) and scores.valid_json == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- bad input, in words
def test_a_reference_that_is_not_json_is_refused_naming_its_row():
    with pytest.raises(ConfigError, match=r"eval\.metric.*held-out row 2 is not JSON"):
        check_references("json_equal", [REFERENCE, "the cup is big", REFERENCE])
    check_references("exact_match", [REFERENCE, "the cup is big"])  # text is fine for text metrics
    with pytest.raises(ConfigError, match="held-out row 1 has no reference"):
        check_references("token_f1", [None])
    check_references("valid_json", [None])  # needs no reference


@pytest.mark.parametrize("content, words", [
    ('{"type": "object", "properties": {"a": {"type": "strnig"}}}', "properties/a/type"),
    ('{"type": 12}', "is not valid under any of the given schemas"),
    ('{"type": "object",', "not valid JSON (line 1"),
    ('[1, 2]', "top level must be an object"),
])
def test_a_schema_file_that_is_not_json_schema_is_refused(tmp_path, content, words):
    path = tmp_path / "bad.schema.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="eval.schema_path") as caught:
        load_schema(path)
    assert words in str(caught.value)
    config = load_preset("demo-lora", ["eval.metric=json_schema", f"eval.schema_path={path}"])
    assert [e.field for e in config.errors()] == ["eval.schema_path"]  # refused when the config is validated


def test_missing_options_and_bad_patterns_are_config_errors(tmp_path):
    assert [e.field for e in option_problems("json_schema", None, None)] == ["eval.schema_path"]
    assert [e.field for e in option_problems("json_schema", str(tmp_path / "nope.json"), None)] == \
        ["eval.schema_path"]
    assert [e.field for e in option_problems("regex", None, None)] == ["eval.pattern"]
    assert "not a regular expression" in str(option_problems("regex", None, "([a-z]")[0])
    assert option_problems("json_equal", None, None) == []


# ----------------------------------------------------------------------------- the eval section
def test_eval_section_round_trips_through_yaml_and_overrides(tmp_path):
    config = load_preset("demo-lora", ["eval.metric=exact_match", "eval.num_samples=7", "eval.max_new_tokens=40"])
    path = tmp_path / "config.yaml"
    config.save(path)
    again = RunConfig.from_yaml(path)
    assert (again.eval.metric, again.eval.num_samples, again.eval.max_new_tokens) == ("exact_match", 7, 40)
    assert again.errors() == []
    assert field_spec("eval.metric").choices[0] == "none"
    assert "json_equal" in field_spec("eval.metric").choices


def test_eval_section_rules_name_the_field():
    config = load_preset("demo-lora", ["eval.num_samples=0", "eval.metric=bleu"])
    assert {e.field for e in config.errors()} == {"eval.num_samples", "eval.metric"}
    no_held_out = load_preset("demo-lora", ["data.eval_path=", "data.eval_fraction=0"])
    no_held_out.set_path("eval.metric", "json_equal")
    assert [e.field for e in no_held_out.errors()] == ["eval.metric"]


def test_demo_presets_score_json():
    for preset in ("demo-lora", "demo-qlora"):
        assert load_preset(preset).eval.metric == "json_equal"


def test_rows_are_cut_before_their_last_answer():
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}, {"text": "plain"}]
    items = prompts_from_rows(rows)
    assert len(items) == 1 and items[0].reference == "a" and items[0].text == "q"
    assert [m["role"] for m in items[0].messages] == ["system", "user"]


# ----------------------------------------------------------------------------- at run start
def test_plan_takes_the_first_rows_and_checks_their_references():
    from engine.training.task_eval import plan_task_eval

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": json.dumps({"i": i})}]}
            for i in range(5)]
    config = load_preset("demo-lora", ["eval.num_samples=3"])
    plan = plan_task_eval(config, rows)
    assert plan.metric == "json_equal" and plan.references == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    assert plan.conversations[0] == [{"role": "user", "content": "q0"}] and plan.notes == []
    config.eval.num_samples = 9
    assert "only 5 held-out prompts" in plan_task_eval(config, rows).notes[0]
    config.eval.metric = "none"
    assert plan_task_eval(config, rows) is None
    config.eval.metric = "exact_match"
    with pytest.raises(ConfigError, match="plain text"):
        plan_task_eval(config, [{"text": "just text"}])


def test_references_longer_than_max_new_tokens_are_said(demo_model_dir):
    """A score of 0 from answers cut short would read as a model that learned nothing: the plan says so."""
    from transformers import AutoTokenizer

    from engine.data.load import load_dataset_rows
    from engine.training.task_eval import plan_task_eval

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    rows = load_dataset_rows("demo", split="eval").rows
    config = load_preset("demo-lora", ["eval.num_samples=16"])
    plan = plan_task_eval(config, rows)
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in plan.references)
    assert plan.length_note(tokenizer) is None and longest <= config.eval.max_new_tokens
    config.eval.max_new_tokens = longest - 1
    note = plan_task_eval(config, rows).length_note(tokenizer)
    assert note.startswith(f"eval.max_new_tokens is {longest - 1}, but ") and f"up to {longest} tokens" in note
    assert note.endswith(f"Raise eval.max_new_tokens to at least {longest}.")
    for preset in ("demo-lora", "demo-qlora", "demo-sweep"):  # every shipped demo can score a full answer
        preset_config = load_preset(preset)
        assert plan_task_eval(preset_config, rows).length_note(tokenizer) is None, preset


@pytest.mark.slow
def test_the_worker_refuses_a_non_json_reference_before_training(tmp_path, demo_model_dir):
    """A json_equal run on text answers fails at start, in words naming the row, with no step trained."""
    from engine.training import rundir
    from engine.training.worker import main as worker_main

    data = str(__import__("pathlib").Path(__file__).parent / "data" / "messages.jsonl")
    config = load_preset("demo-lora", [f"data.path={data}", f"data.eval_path={data}", "eval.metric=json_equal"])
    run_dir = rundir.create_run(tmp_path, config.validate(), name="text-answers")
    assert worker_main([str(run_dir)]) == 1
    status = rundir.read_status(run_dir)
    assert status["state"] == "failed"
    assert "held-out row 1 is not JSON" in status["error"] and "exact_match or token_f1" in status["error"]
    assert rundir.read_metrics(run_dir) == [] and status.get("step", 0) == 0  # nothing was trained
    from engine.training import devices

    # Run inside this process, the worker still gives the device back: later runs must not wait for pytest.
    assert devices.holder(devices.device_key("cpu")) is None and not rundir.worker_lock_held(run_dir)
