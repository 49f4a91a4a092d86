"""RunConfig: YAML round trip, overrides, and an error that names field, value and range for each bad input."""

import shlex

import pytest
import yaml

from engine.config import RunConfig, list_presets, load_preset
from engine.errors import ConfigError


def test_every_preset_loads_validates_and_round_trips(tmp_path):
    names = list_presets()
    assert {"lora", "qlora", "dora", "rslora", "demo-lora", "demo-qlora"} <= set(names)
    for name in names:
        config = load_preset(name).validate()
        path = tmp_path / f"{name}.yaml"
        config.save(path)
        again = RunConfig.from_yaml(path)
        assert again.to_dict() == config.to_dict()


def test_presets_carry_the_seed_recipe():
    qlora = load_preset("qlora")
    assert qlora.method == "qlora"
    assert (qlora.lora.r, qlora.lora.lora_alpha, qlora.lora.lora_dropout) == (16, 32, 0.05)
    assert qlora.quant.bnb_4bit_quant_type == "nf4" and qlora.quant.bnb_4bit_use_double_quant
    assert qlora.quant.bnb_4bit_compute_dtype == "bfloat16"
    assert qlora.train.optim == "paged_adamw_32bit" and qlora.train.gradient_checkpointing
    assert (qlora.train.lr_scheduler_type, qlora.train.warmup_steps) == ("cosine", 0.03)
    assert (qlora.train.learning_rate, qlora.train.max_grad_norm) == (2e-4, 0.3)
    assert qlora.train.assistant_only_loss
    assert load_preset("dora").method == "dora" and load_preset("rslora").method == "rslora"
    assert load_preset("demo-qlora").quant.load_in_4bit


def test_overrides_parse_types_and_lists():
    config = load_preset("demo-lora", ["train.max_steps=50", "lora.target_modules=q_proj,v_proj",
                                       "train.learning_rate=1e-4", "train.packing=true", "method=qlora"])
    assert config.train.max_steps == 50
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.packing is True
    assert config.method == "qlora" and config.quant.load_in_4bit


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("lora.r=0", "lora.r", "positive integer"),
        ("lora.r=2.5", "lora.r", "positive integer"),
        ("lora.lora_dropout=1.0", "lora.lora_dropout", "0 <= dropout < 1"),
        ("lora.lora_dropout=-0.1", "lora.lora_dropout", "0 <= dropout < 1"),
        ("train.learning_rate=0", "train.learning_rate", "> 0"),
        ("train.learning_rate=-1e-4", "train.learning_rate", "> 0"),
        ("train.max_length=4", "train.max_length", "8 to"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size", "positive integer"),
        ("train.optim=adamw_torchh", "train.optim", "did you mean 'adamw_torch'"),
        ("data.eval_fraction=1.5", "data.eval_fraction", "0 <= fraction < 1"),
        ("lora.target_modules=[]", "lora.target_modules", "non-empty list"),
    ],
)
def test_each_invalid_value_names_field_value_and_range(override, field, words):
    config = load_preset("demo-lora", [override])
    errors = config.errors()
    assert [e.field for e in errors] == [field], errors
    assert words in str(errors[0])
    section, name = field.split(".")
    assert repr(getattr(getattr(config, section), name)) in str(errors[0])  # the offending value is quoted
    with pytest.raises(ConfigError):
        config.validate()


def test_unknown_yaml_key_suggests_the_closest_valid_one(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"lora": {"rank": 8}}))
    with pytest.raises(ConfigError, match=r"lora\.rank.*unknown field.*did you mean 'r'"):
        RunConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"trian": {"max_steps": 3}}))
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        RunConfig.from_yaml(path)


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lora:\n  r: 8\n   lora_alpha: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line \d"):
        RunConfig.from_yaml(path)


def test_four_bit_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    errors = load_preset("demo-qlora").errors()
    assert any(e.field == "quant.load_in_4bit" and "bitsandbytes" in str(e) for e in errors)


def test_method_is_derived_from_fields_not_stored_twice():
    config = load_preset("demo-lora")
    config.set_method("dora")
    assert config.lora.use_dora and not config.quant.load_in_4bit and config.method == "dora"
    assert "method" not in config.to_dict()


def test_method_is_derived_in_one_place_for_every_method():
    for method in ("lora", "qlora", "lora8bit", "dora", "rslora", "full"):
        config = load_preset("demo-lora", [f"method={method}"])
        assert config.method == method
        assert RunConfig.from_dict(config.to_dict()).method == method  # survives the YAML round trip
    eight_bit = load_preset("demo-lora", ["method=lora8bit"])
    from engine.memory import settings_from_run_config

    assert settings_from_run_config(eight_bit)[1].method == "lora8bit"  # the Memory tab agrees with the table


def test_full_fine_tuning_of_a_quantized_base_is_refused():
    config = load_preset("demo-qlora", ["lora.use_peft=false"])
    assert [e.field for e in config.errors()] == ["lora.use_peft"]


@pytest.mark.parametrize("override, field, words", [
    ("lora.lora_alpha=.inf", "lora.lora_alpha", "> 0"),
    ("lora.lora_alpha=1e30", "lora.lora_alpha", "at most 1000000"),
    ("lora.r=1e30", "lora.r", "at most 4096"),
    ("train.seed=1e30", "train.seed", "at most 4294967295"),
    ("train.per_device_train_batch_size=1e30", "train.per_device_train_batch_size", "at most 65536"),
    ("train.learning_rate=.nan", "train.learning_rate", "> 0"),
    ("train.warmup_steps=1.5", "train.warmup_steps", "ratio in [0, 1)"),
    ("train.max_steps=abc", "train.max_steps", "-1 (use epochs) or a positive integer"),
    ("train.lr_scheduler_type=cosine_with_min_lr", "train.lr_scheduler_kwargs", "min_lr_rate"),
])
def test_numbers_are_finite_and_within_sane_ranges(override, field, words):
    errors = load_preset("demo-lora", [override]).errors()
    assert [e.field for e in errors] == [field], errors
    assert words in str(errors[0])


def test_choices_come_from_transformers_and_trl_without_importing_them():
    import subprocess
    import sys

    code = ("import sys; from engine.config.choices import optimizer_names, scheduler_names; "
            "o, s = optimizer_names(), scheduler_names(); assert 'transformers' not in sys.modules; "
            "from transformers.trainer_utils import SchedulerType; from transformers.training_args import "
            "OptimizerNames; assert s == tuple(e.value for e in SchedulerType), s; "
            "assert o == tuple(e.value for e in OptimizerNames), o; "
            "from engine.config.choices import packing_strategies; p = packing_strategies(); "
            "assert 'trl' not in sys.modules; import dataclasses; from trl import SFTConfig; "
            "assert list(p) == {f.name: f for f in dataclasses.fields(SFTConfig)}['packing_strategy']"
            ".metadata['choices'], p; print(len(o), len(s))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    optimizers, schedulers = map(int, done.stdout.split())
    assert optimizers > 10 and schedulers > 5


def test_every_field_has_help_a_label_and_a_rule_the_form_can_read():
    from engine.config import field_specs

    for item in field_specs():
        assert item.help and item.label, item.path
        assert item.kind in ("bool", "int", "float", "number", "str", "modules", "list", "mapping"), item.path
        assert item.problem(item.default) is None, (item.path, item.default)  # every default is valid


def test_form_round_trip_and_show_command_come_from_the_metadata():
    from engine.config import command_line, config_diff
    from ui.train_tab import FIELD_NAMES, config_to_values, form_to_config

    config = load_preset("demo-lora", ["lora.r=8", "lora.target_modules=q_proj,v_proj", "train.max_steps=7"])
    values = config_to_values(config)
    again, errors = form_to_config("demo-lora", config.method, *values)
    assert errors == [] and again.to_dict() == config.to_dict()
    typed = dict(zip(FIELD_NAMES, values), **{"lora.r": 8.0, "data.eval_path": " "})  # a Number box gives floats
    again, errors = form_to_config("demo-lora", "qlora", *typed.values())
    assert errors == [] and again.lora.r == 8 and isinstance(again.lora.r, int) and again.data.eval_path is None
    line = command_line("demo-lora", config)
    assert "presets/demo-lora.yaml" in line and "--set lora.r=8" in line and "lora.target_modules=q_proj,v_proj" in line
    words = shlex.split(line.replace("\\\n", " "))
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert load_preset("demo-lora", overrides).to_dict() == config.to_dict()  # the line rebuilds the same config
    headers, rows = config_diff({"a": load_preset("demo-lora"), "b": config})
    assert headers == ["field", "a", "b"]
    assert [row[0] for row in rows[:3]] == ["≠ lora.r", "≠ lora.target_modules", "≠ train.max_steps"]
