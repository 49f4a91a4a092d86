"""A sweep's plan: one field (or two, a small grid) and its values, expanded into ordinary run configs.

``--vary lora.r=4,8,16`` reads like ``--set``: the values are ``--set`` values, separated by
commas, or by ``|`` when a value itself holds commas (``lora.target_modules=q_proj,v_proj |
all-linear``). Each combination becomes the preset plus the ``--set`` overrides plus one
override per varied field, applied by ``RunConfig.apply_overrides`` (the same code as
``python -m engine train --set``), and validated before anything is created: a value the
config refuses is refused here with the config's own sentence, naming the value.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from engine.config import load_preset
from engine.config.schema import field_spec
from engine.errors import ConfigError, LoraLabError

MAX_FIELDS = 2  # one field, or a small grid of two
MAX_RUNS = 16  # a sweep is a handful of runs one at a time, not a search


@dataclass
class Vary:
    """One varied field and its values as typed (``--set`` text)."""

    field: str
    values: list[str]

    @property
    def short(self) -> str:
        """The field's last part (``r`` for lora.r), used in labels and run names."""
        return self.field.rsplit(".", 1)[-1]

    def as_text(self) -> str:
        joiner = " | " if any("," in v for v in self.values) else ","
        return f"{self.field}={joiner.join(self.values)}"


@dataclass
class PlannedRun:
    """One run of the sweep before it exists: its values, its config and its predicted peak."""

    values: dict[str, str]  # field -> value text, in the order of the varied fields
    config: object  # RunConfig
    predicted_peak_bytes: int | None = None
    prediction_note: str | None = None  # why there is no prediction

    @property
    def label(self) -> str:
        """``r=8`` or ``r=8, learning_rate=1e-4``: how tables and charts name the run."""
        return ", ".join(f"{name.rsplit('.', 1)[-1]}={value}" for name, value in self.values.items())

    @property
    def overrides(self) -> list[str]:
        return [f"{name}={value}" for name, value in self.values.items()]


@dataclass
class SweepPlan:
    preset: str
    overrides: list[str]
    varies: list[Vary]
    runs: list[PlannedRun] = field(default_factory=list)
    base: object = None  # the preset with the --set overrides, validated (RunConfig)

    def table(self) -> list[list]:
        """One row per run: its values and predicted peak (MiB), for the CLI and the Sweeps tab."""
        return [[*run.values.values(), None if run.predicted_peak_bytes is None
                 else round(run.predicted_peak_bytes / 2**20)] for run in self.runs]


def parse_vary(text: str) -> Vary:
    """``section.field=v1,v2`` (or ``v1 | v2``) as a ``Vary``; a sentence when it cannot be read."""
    text = str(text or "").strip()
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError("--vary", f"'{text}' must look like section.field=v1,v2 (e.g. lora.r=4,8,16); "
                                    "use | between values that contain commas (lora.target_modules=q_proj,v_proj | "
                                    "all-linear).")
    if name != "method":
        field_spec(name)  # an unknown field is refused here, with a "did you mean"
    if name == "name":
        raise ConfigError("--vary", "run names are made by the sweep; vary a training field instead.")
    parts = raw.split("|") if "|" in raw else raw.split(",")
    values = [part.strip() for part in parts]
    if len(values) < 2 or any(not value for value in values):
        raise ConfigError(name, f"a sweep needs at least two non-empty values, got '{raw.strip()}'.")
    if len(set(values)) != len(values):
        twice = sorted({value for value in values if values.count(value) > 1})
        raise ConfigError(name, f"the value {', '.join(twice)} is listed twice.")
    return Vary(field=name, values=values)


def expand(preset: str, varies: list[Vary | str], overrides: list[str] | None = None,
           predict: bool = True) -> SweepPlan:
    """Every combination of the varied values as a validated ``RunConfig``; nothing is created.

    Raises ``ConfigError`` naming the field and value the config refuses, before any run starts.
    ``predict``: each run's predicted peak from the memory estimator (``engine.memory``, its one owner).
    """
    varies = [parse_vary(v) if isinstance(v, str) else v for v in varies]
    overrides = list(overrides or [])
    if not varies:
        raise ConfigError("--vary", "name one field to vary, e.g. --vary lora.r=4,8,16.")
    if len(varies) > MAX_FIELDS:
        raise ConfigError("--vary", f"a sweep varies one field, or two for a small grid; got {len(varies)}.")
    if len({v.field for v in varies}) != len(varies):
        raise ConfigError("--vary", f"{varies[0].field} is varied twice; list all its values in one --vary.")
    varied = {v.field for v in varies}
    for item in overrides:
        if item.partition("=")[0].strip() in varied:
            raise ConfigError(item.partition("=")[0].strip(), "is both varied and set with --set; drop one.")
    count = 1
    for vary in varies:
        count *= len(vary.values)
    if count > MAX_RUNS:
        raise ConfigError("--vary", f"{count} runs is more than a sweep runs one at a time ({MAX_RUNS} at most); "
                                    "vary fewer values.")
    base = load_preset(preset, overrides).validate()  # the base's own problems first, as the config says them
    for vary in varies:  # each value alone against the base: the refusal names exactly the value
        for value in vary.values:
            _config(preset, overrides, {vary.field: value}, vary.field)
    plan = SweepPlan(preset=preset, overrides=overrides, varies=varies, base=base)
    for combination in itertools.product(*(vary.values for vary in varies)):
        values = dict(zip([v.field for v in varies], combination))
        config = _config(preset, overrides, values, " and ".join(values))
        plan.runs.append(PlannedRun(values=values, config=config))
    if predict:
        for run in plan.runs:
            run.predicted_peak_bytes, run.prediction_note = predicted_peak(run.config)
    return plan


def _config(preset: str, overrides: list[str], values: dict[str, str], where: str):
    try:
        return load_preset(preset, overrides + [f"{name}={value}" for name, value in values.items()]).validate()
    except ConfigError as error:
        shown = ", ".join(f"{name}={value}" for name, value in values.items())
        reason = str(error)
        if getattr(error, "field", None) == where:  # the config already named the field: say it once
            reason = reason[len(where) + 2:]
        raise ConfigError(where, f"the sweep value {shown} is refused: {reason}") from None


def predicted_peak(config) -> tuple[int | None, str | None]:
    """The memory estimator's predicted peak (what nvidia-smi would show) for a run, or why there is none."""
    from engine.memory import estimate_for_run_config

    try:
        return estimate_for_run_config(config).nvidia_smi_bytes, None
    except LoraLabError as error:
        return None, str(error)
    except (OSError, ValueError, KeyError) as error:  # an architecture the estimator cannot read
        return None, f"no prediction ({type(error).__name__}: {str(error)[:120]})"


_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def value_slug(value: str) -> str:
    """A value as part of a run name: ``q_proj,v_proj`` -> ``q_proj-v_proj``."""
    return _SLUG.sub("-", value).strip("-.")[:24] or "v"
