"""Task metrics: does the generated answer do the job, not only lower the loss?

Each metric is a function ``(prediction, reference, options) -> float`` in [0, 1]; a
run's score is the mean over its fixed held-out subset. ``METRICS`` is the registry the
config's choices, the Train form, the CLI and the charts read (name, description, and
whether higher is better).

Bad input is refused before a run spends any time, in words:
``option_problems`` checks the run's options (a schema file that is not JSON Schema, a
pattern that is not a regular expression) when the config is validated, and
``check_references`` checks the held-out references (a ``json_equal`` reference that is
not JSON names its row) when the run starts.

This module imports only the standard library (and ``jsonschema`` when a schema is
used), so the config schema can read the registry without pulling in torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError

NONE = "none"


# ----------------------------------------------------------------------------- the metric functions
def _strip(text: str | None) -> str:
    return (text or "").strip()


def parse_json(text: str | None):
    """The JSON value in ``text``, or raises ``ValueError``.

    A fenced block (```json ... ```), which chat models often wrap answers in, is
    unwrapped first; anything else around the JSON makes it invalid.
    """
    text = _strip(text)
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    return json.loads(fenced.group(1) if fenced else text)


def exact_match(prediction: str, reference: str, options: dict | None = None) -> float:
    """1 when the answer equals the reference (surrounding whitespace ignored)."""
    return float(_strip(prediction) == _strip(reference))


def json_equal(prediction: str, reference: str, options: dict | None = None) -> float:
    """1 when the answer parses as JSON equal to the reference's (key order and spacing ignored)."""
    if _strip(prediction) == _strip(reference):
        return 1.0
    try:
        return float(parse_json(prediction) == parse_json(reference))
    except ValueError:
        return 0.0


def valid_json(prediction: str, reference: str | None = None, options: dict | None = None) -> float:
    """1 when the answer parses as JSON (the reference is not used)."""
    try:
        parse_json(prediction)
    except ValueError:
        return 0.0
    return 1.0


def json_schema_valid(prediction: str, reference: str | None = None, options: dict | None = None) -> float:
    """1 when the answer parses as JSON and validates against ``options["schema"]``."""
    try:
        value = parse_json(prediction)
    except ValueError:
        return 0.0
    return float(_validator(options).is_valid(value))


def contains(prediction: str, reference: str, options: dict | None = None) -> float:
    """1 when the reference occurs in the answer (case-insensitive)."""
    return float(_strip(reference).lower() in (prediction or "").lower())


def regex_match(prediction: str, reference: str | None = None, options: dict | None = None) -> float:
    """1 when ``options["pattern"]`` matches somewhere in the answer (anchor it with ^...$ for the whole)."""
    pattern = (options or {}).get("pattern")
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern or "")
    return float(compiled.search(prediction or "") is not None)


_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def answer_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: '{"size": "big"}' -> { " size " : " big " }."""
    return _TOKEN.findall((text or "").lower())


def token_f1(prediction: str, reference: str, options: dict | None = None) -> float:
    """Token-overlap F1 (SQuAD style) between an answer and the reference, in [0, 1].

    Punctuation marks count as tokens, unlike SQuAD: for structured answers (JSON, lists,
    code) the shape is part of being right, and a word-only score would call a sentence
    that merely repeats the prompt's words as close as a well-formed answer.
    """
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Metric:
    name: str
    function: Callable[[str, str, dict | None], float]
    description: str
    higher_is_better: bool = True
    needs_reference: bool = True
    reference_must_be_json: bool = False

    def __call__(self, prediction: str, reference: str | None, options: dict | None = None) -> float:
        return self.function(prediction, reference, options)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", exact_match, "share of answers equal to the reference (whitespace around ignored)"),
    Metric("json_equal", json_equal, "share of answers equal to the reference as JSON (key order and spacing "
           "ignored)", reference_must_be_json=True),
    Metric("valid_json", valid_json, "share of answers that parse as JSON", needs_reference=False),
    Metric("json_schema", json_schema_valid, "share of answers that are JSON valid against eval.schema_path",
           needs_reference=False),
    Metric("contains", contains, "share of answers that contain the reference (case-insensitive)"),
    Metric("regex", regex_match, "share of answers matched by the regular expression eval.pattern",
           needs_reference=False),
    Metric("token_f1", token_f1, "mean token-overlap F1 between answer and reference (words and punctuation)"),
)}
METRIC_CHOICES = (NONE, *METRICS)


def metric_choices() -> tuple[str, ...]:
    return METRIC_CHOICES


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError("eval.metric", f"'{name}' is not a metric; choose one of {', '.join(METRIC_CHOICES)}.") \
            from None


# ----------------------------------------------------------------------------- options and references
def load_schema(path: str | Path) -> dict:
    """A JSON Schema document from a file, checked against its meta-schema; ConfigError in words otherwise."""
    from jsonschema import exceptions, validators

    path = Path(path).expanduser()
    field = "eval.schema_path"
    if not path.is_file():
        raise ConfigError(field, f"no such schema file: {path}.")
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ConfigError(field, f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                                 f"{error.msg}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(field, f"{path} cannot be read ({error}).") from None
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(field, f"{path} is not a JSON Schema: the top level must be an object, got "
                                 f"{type(schema).__name__}.")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise ConfigError(field, f"{path} is not a valid JSON Schema: at {where}, {error.message}.") from None
    return schema


def _validator(options: dict | None):
    options = options or {}
    validator = options.get("validator")
    if validator is None:
        from jsonschema import validators

        schema = options.get("schema", True)
        validator = validators.validator_for(schema)(schema)
    return validator


def build_options(metric: str, schema_path: str | None = None, pattern: str | None = None) -> dict:
    """The options a metric needs, read and checked once (ConfigError in words when wrong)."""
    if metric == "json_schema":
        if not schema_path:
            raise ConfigError("eval.schema_path", "the json_schema metric needs a JSON Schema file here.")
        from jsonschema import validators

        schema = load_schema(schema_path)
        return {"schema": schema, "validator": validators.validator_for(schema)(schema)}
    if metric == "regex":
        if not pattern:
            raise ConfigError("eval.pattern", "the regex metric needs a regular expression here, e.g. ^\\{.*\\}$.")
        try:
            return {"pattern": re.compile(pattern)}
        except re.error as error:
            raise ConfigError("eval.pattern", f"{pattern!r} is not a regular expression ({error}).") from None
    return {}


def option_problems(metric: str, schema_path: str | None, pattern: str | None) -> list[ConfigError]:
    """Every problem with the metric's options, for ``RunConfig.errors()`` (empty when fine)."""
    if metric not in METRICS:
        return []  # the choice itself is reported by the field's own rule
    try:
        build_options(metric, schema_path, pattern)
    except ConfigError as error:
        return [error]
    return []


def check_references(metric: str, references: list[str | None], where: str = "held-out row") -> None:
    """Refuse, naming the row, a reference the metric cannot use (checked before training starts)."""
    spec = get_metric(metric)
    if not spec.needs_reference:
        return
    for number, reference in enumerate(references, start=1):
        if reference is None or not str(reference).strip():
            raise ConfigError("eval.metric", f"{metric} compares answers with a reference, but {where} {number} "
                                             "has no reference answer.")
        if spec.reference_must_be_json:
            try:
                parse_json(reference)
            except ValueError as error:
                raise ConfigError("eval.metric", f"{metric} needs JSON references, but the reference of {where} "
                                                 f"{number} is not JSON ({error}): {str(reference)[:80]!r}. "
                                                 "Choose exact_match or token_f1 for text answers.") from None


# ----------------------------------------------------------------------------- scoring a set
@dataclass
class Scores:
    """A metric over a set of answers: the mean and each item's score."""

    metric: str
    items: list[float]
    valid_json: float

    @property
    def score(self) -> float:
        return sum(self.items) / len(self.items) if self.items else 0.0

    @property
    def n(self) -> int:
        return len(self.items)


def score_answers(metric: str, predictions: list[str], references: list[str | None],
                  options: dict | None = None) -> Scores:
    """Score every answer; also the share of valid JSON (cheap, and telling for structured tasks)."""
    spec = get_metric(metric)
    items = [spec(p, r, options) for p, r in zip(predictions, references)]
    valid = sum(valid_json(p) for p in predictions) / len(predictions) if predictions else 0.0
    return Scores(metric=metric, items=items, valid_json=valid)
