"""Evaluation metrics: what each metric is (configs) and how one example scores (`score_example`).

One record per example goes in (a plain dict, usually a row of the evaluation flow's output):

    {"id": "q1", "input": "Capital of France?", "reference": "Paris", "tags": ["geo"],
     "prediction": "paris.", "error": "", "latency_s": 0.42, "num_input_tokens": 12,
     "num_generated_tokens": 3, "judge": {"score": 4}, "judge_error": ""}

and one `ScoredExample` comes out, with a score per metric name:

    ScoredExample(id="q1", tags=["geo"], error="", judge_error="",
                  scores={"exact_match": 1.0, "judge": 0.75, "latency": 0.42})

Quality metrics are bounded to [0, 1], higher is better; measurements (length, latency, tokens)
are raw values. An example whose target call failed scores 0.0 on every quality metric, so it stays
in the denominator, and None on measurements. A judge reply that failed or carries no usable score
gives None (excluded from the mean, counted as a judge error), never 0.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from prefect_rayllm.rayllm_stages.config.base import StrictModel

_NAME_PATTERN = r"^[A-Za-z0-9_.-]*$"
# Punctuation and whitespace dropped at both ends by normalisation, typographic quotes included.
_END_CHARS = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb"
# The first number in a text: sign, thousands separators, decimals, exponent ("-1,234.5e3").
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_CODE_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


class EvalRecord(BaseModel):
    """One example as the evaluation flow hands it over. Extra columns are ignored."""

    # Not StrictModel: rows carry whatever columns the dataset and the engine added.
    model_config = ConfigDict(extra="ignore")

    id: str
    input: str = ""
    reference: str | None = None
    tags: list[str] = Field(default_factory=list)
    prediction: str | None = None
    error: str = ""
    latency_s: float | None = None
    num_input_tokens: int = 0
    num_generated_tokens: int = 0
    judge: Any = None
    judge_error: str = ""

    @field_validator("latency_s")
    @classmethod
    def _nan_is_missing(cls, value: float | None) -> float | None:
        # Arrow/pandas turn a missing float into NaN.
        return None if value is None or math.isnan(value) else value

    @field_validator("error", "judge_error", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("tags", mode="before")
    @classmethod
    def _none_is_no_tags(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def text(self) -> str:
        """The prediction, "" when the target answered nothing."""
        return self.prediction or ""


class ScoredExample(StrictModel):
    """One example's scores, keyed by metric name; None means not scored (excluded from means)."""

    id: str
    tags: list[str] = Field(default_factory=list)
    error: str = ""
    judge_error: str = ""
    scores: dict[str, float | None] = Field(default_factory=dict)


def normalize_text(text: str, lowercase: bool = True) -> str:
    """Lowercase, drop punctuation, quotes and whitespace at both ends, collapse inner whitespace.

    Example: `normalize_text(' "The  Answer." ')` -> `"the answer"`.
    """
    text = " ".join(text.strip(_END_CHARS).split())
    return text.lower() if lowercase else text


def first_number(text: str) -> float | None:
    """The first number in `text` ("about 1,234.5 km" -> 1234.5), None when there is none."""
    match = _NUMBER.search(text)
    return float(match.group(0).replace(",", "")) if match else None


class _Metric(StrictModel):
    """Fields and defaults every metric shares; `name` defaults to the metric's type."""

    name: str = Field("", pattern=_NAME_PATTERN, description="Key in scores and reports; default: the type")

    quality: ClassVar[bool] = True

    @model_validator(mode="after")
    def _default_name(self) -> _Metric:
        if not self.name:
            self.name = self.type
        return self

    @property
    def needs_reference(self) -> bool:
        return False

    def reference_problem(self, record: EvalRecord) -> str:
        """Why this record's reference cannot be used by this metric; "" when it can."""
        if self.needs_reference and record.reference is None:
            return "needs a reference and the example has none"
        return ""

    def value(self, record: EvalRecord) -> float | None:
        """The score of an example whose target answered (`record.error == ""`)."""
        raise NotImplementedError


class ExactMatchMetric(_Metric):
    """1.0 when the prediction equals the reference (after `normalize_text` unless normalize=False)."""

    type: Literal["exact_match"] = "exact_match"
    normalize: bool = True

    @property
    def needs_reference(self) -> bool:
        return True

    def value(self, record: EvalRecord) -> float:
        prediction, reference = record.text, record.reference or ""
        if self.normalize:
            prediction, reference = normalize_text(prediction), normalize_text(reference)
        return float(prediction == reference)


class ContainsMetric(_Metric):
    """1.0 when the normalised prediction contains the normalised reference."""

    type: Literal["contains"] = "contains"
    case_sensitive: bool = False

    @property
    def needs_reference(self) -> bool:
        return True

    def value(self, record: EvalRecord) -> float:
        lowercase = not self.case_sensitive
        reference = normalize_text(record.reference or "", lowercase)
        return float(reference in normalize_text(record.text, lowercase))


class RegexMetric(_Metric):
    """1.0 when the pattern is found anywhere in the prediction (`re.search`; anchor with ^ and $).

    With `use_reference`, each example's reference is its pattern and `pattern` must be unset.
    """

    type: Literal["regex"] = "regex"
    pattern: str | None = None
    use_reference: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from error
        return value

    @model_validator(mode="after")
    def _one_pattern_source(self) -> RegexMetric:
        if self.use_reference == (self.pattern is not None):
            raise ValueError("set either pattern or use_reference: true (the reference is the pattern)")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.use_reference

    def reference_problem(self, record: EvalRecord) -> str:
        problem = super().reference_problem(record)
        if problem or not self.use_reference:
            return problem
        try:
            re.compile(record.reference or "")
        except re.error as error:
            return f"reference is not a valid regular expression: {error}"
        return ""

    def value(self, record: EvalRecord) -> float:
        pattern = record.reference if self.use_reference else self.pattern
        return float(re.search(pattern or "", record.text) is not None)


class NumericMetric(_Metric):
    """1.0 when the first number in the prediction is within tolerance of the reference's number.

    `relative`: the tolerance is a fraction of |reference| (0.01 = within 1%).
    """

    type: Literal["numeric"] = "numeric"
    tolerance: float = Field(0.0, ge=0.0)
    relative: bool = False

    @property
    def needs_reference(self) -> bool:
        return True

    def reference_problem(self, record: EvalRecord) -> str:
        problem = super().reference_problem(record)
        if not problem and first_number(record.reference or "") is None:
            return f"needs a number in the reference, got {record.reference!r}"
        return problem

    def value(self, record: EvalRecord) -> float:
        predicted = first_number(record.text)
        expected = first_number(record.reference or "")
        if predicted is None or expected is None:
            return 0.0
        allowed = self.tolerance * abs(expected) if self.relative else self.tolerance
        difference = abs(predicted - expected)
        # 1.1 - 1.0 is 0.10000000000000009: a tolerance of 0.1 must still accept it.
        return float(difference <= allowed or math.isclose(difference, allowed, rel_tol=1e-9, abs_tol=1e-12))


class JsonSchemaMetric(_Metric):
    """1.0 when the prediction parses as JSON and validates against `schema`.

    A Markdown code fence around the JSON (```json ... ```) is removed first unless
    `strip_code_fence` is False.
    """

    type: Literal["json_schema"] = "json_schema"
    schema_: dict[str, Any] = Field(alias="schema")
    strip_code_fence: bool = True

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        validator = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(value)
        except jsonschema.SchemaError as error:
            raise ValueError(f"not a valid JSON schema: {error.message}") from error
        return value

    def value(self, record: EvalRecord) -> float:
        text = record.text.strip()
        if self.strip_code_fence and (fenced := _CODE_FENCE.match(text)):
            text = fenced.group(1)
        try:
            document = json.loads(text)
        except ValueError:
            return 0.0
        return float(_schema_validator(json.dumps(self.schema_, sort_keys=True)).is_valid(document))


@lru_cache(maxsize=32)
def _schema_validator(schema_json: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


class LengthMetric(_Metric):
    """The prediction's length in characters, whitespace-separated words or generated tokens."""

    type: Literal["length"] = "length"
    unit: Literal["chars", "words", "tokens"] = "chars"

    quality: ClassVar[bool] = False

    def value(self, record: EvalRecord) -> float:
        if self.unit == "tokens":
            return float(record.num_generated_tokens)
        if self.unit == "words":
            return float(len(record.text.split()))
        return float(len(record.text))


class LatencyMetric(_Metric):
    """Seconds the target took for the example (`latency_s`); None when not recorded."""

    type: Literal["latency"] = "latency"

    quality: ClassVar[bool] = False

    def value(self, record: EvalRecord) -> float | None:
        return record.latency_s


class TokensMetric(_Metric):
    """Input plus generated tokens of the example."""

    type: Literal["tokens"] = "tokens"

    quality: ClassVar[bool] = False

    def value(self, record: EvalRecord) -> float:
        return float(record.num_input_tokens + record.num_generated_tokens)


class JudgeMetric(_Metric):
    """The judge's score, read from `record["judge"][score_field]`, mapped from [min, max] to [0, 1].

    A failed judge call, a reply without a numeric score or a score outside [min_score, max_score]
    gives None and a judge error.
    """

    type: Literal["judge"] = "judge"
    score_field: str = "score"
    min_score: float = 1.0
    max_score: float = 5.0

    @model_validator(mode="after")
    def _range(self) -> JudgeMetric:
        if self.max_score <= self.min_score:
            raise ValueError("max_score must be greater than min_score")
        return self

    def judge_score(self, record: EvalRecord) -> tuple[float | None, str]:
        """(normalised score, "") or (None, why the judge reply is unusable)."""
        if record.judge_error:
            return None, record.judge_error
        if not isinstance(record.judge, Mapping):
            return None, "no judge reply"
        raw = record.judge.get(self.score_field)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            return None, f"judge reply has no numeric {self.score_field!r}: {raw!r}"
        if not self.min_score <= raw <= self.max_score:
            return None, f"judge {self.score_field} {raw} outside [{self.min_score:g}, {self.max_score:g}]"
        return (raw - self.min_score) / (self.max_score - self.min_score), ""

    def value(self, record: EvalRecord) -> float | None:
        return self.judge_score(record)[0]


MetricSpec = Annotated[
    ExactMatchMetric
    | ContainsMetric
    | RegexMetric
    | NumericMetric
    | JsonSchemaMetric
    | LengthMetric
    | LatencyMetric
    | TokensMetric
    | JudgeMetric,
    Field(discriminator="type"),
]

_METRIC_LIST = TypeAdapter(list[MetricSpec])


def parse_metrics(raw: Iterable[Mapping[str, Any] | _Metric]) -> list[MetricSpec]:
    """Metric configs from dicts (YAML, flow parameters); names must be unique.

    Example: `parse_metrics([{"type": "exact_match"}, {"type": "numeric", "tolerance": 0.01}])`.
    """
    metrics = _METRIC_LIST.validate_python(
        [item.model_dump(by_alias=True) if isinstance(item, _Metric) else item for item in raw]
    )
    check_metric_names(metrics)
    return metrics


def check_metric_names(metrics: Iterable[MetricSpec]) -> None:
    """Raise ValueError naming a metric name used twice (two metrics of one type need names)."""
    seen: set[str] = set()
    for metric in metrics:
        if metric.name in seen:
            raise ValueError(f"metric name {metric.name!r} is used twice; give each metric its own name")
        seen.add(metric.name)


def quality_metric_names(metrics: Iterable[MetricSpec]) -> list[str]:
    """Names of the bounded, higher-is-better metrics (not length, latency, tokens)."""
    return [metric.name for metric in metrics if metric.quality]


def missing_references(metrics: Iterable[MetricSpec], records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of records lacking a reference some metric needs, in input order.

    "Lacking" includes unusable: no number in it (numeric), not a valid pattern (regex with
    use_reference). `score_example` raises ValueError on exactly these records.
    """
    metrics = list(metrics)
    ids = []
    for raw in records:
        record = EvalRecord.model_validate(raw)
        if any(metric.reference_problem(record) for metric in metrics):
            ids.append(record.id)
    return ids


def score_example(metrics: Iterable[MetricSpec], record: Mapping[str, Any]) -> ScoredExample:
    """Score one example on every metric.

    Raises:
        ValueError: a metric needs a reference the example lacks (check `missing_references` first).
    """
    example = EvalRecord.model_validate(record)
    failed = bool(example.error)
    scores: dict[str, float | None] = {}
    judge_problems: list[str] = []
    for metric in metrics:
        if problem := metric.reference_problem(example):
            raise ValueError(f"example {example.id!r}, metric {metric.name!r}: {problem}")
        if failed:
            scores[metric.name] = 0.0 if metric.quality else None
        elif isinstance(metric, JudgeMetric):
            scores[metric.name], problem = metric.judge_score(example)
            if problem and problem not in judge_problems:
                judge_problems.append(problem)
        else:
            scores[metric.name] = metric.value(example)
    return ScoredExample(
        id=example.id,
        tags=example.tags,
        error=example.error,
        judge_error="; ".join(judge_problems),
        scores=scores,
    )
