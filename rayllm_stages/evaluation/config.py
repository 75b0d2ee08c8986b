"""Evaluation configuration: a dataset, one or more targets, metrics, an optional judge, a baseline
and a gate. The YAML file, the CLI input and the `evaluate` flow's parameter are this model."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import OutputJobConfig, StrictModel, storage_block_field
from prefect_rayllm.rayllm_stages.config.models import ModelSpec, PromptTemplate, SamplingParams
from prefect_rayllm.rayllm_stages.evaluation.metrics import JudgeMetric, MetricSpec, check_metric_names
from prefect_rayllm.rayllm_stages.evaluation.stats import BootstrapConfig, GateConfig, check_gate_metrics
from prefect_rayllm.rayllm_stages.llm.prompts import template_fields

DEFAULT_JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
    "required": ["score"],
}
# Columns the evaluation adds to each dataset row; a dataset column of the same name is refused.
PREDICTION_COLUMN = "prediction"
JUDGEMENT_COLUMN = "judgement"
# What a judge rubric calls the expected answer, whatever the dataset's reference_field is named.
REFERENCE_FIELD = "reference"


class EvalDataset(StrictModel):
    """Where the examples are and which fields hold what."""

    path: str = Field(description="fsspec URL of a JSONL or Parquet table")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    id_field: str | None = Field(None, description="unique example id; default: the row number")
    input_field: str = "input"
    reference_field: str | None = Field("reference", description="expected answer; None when no metric needs one")
    tags_field: str | None = Field("tags", description="slice tags: a string or a list of strings per row")


class EvalTarget(StrictModel):
    """A model under evaluation: run in-process on vLLM, hosted by Serve, or an OpenAI-compatible URL."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSpec


class JudgeConfig(StrictModel):
    """A second model that grades each answer with a rubric; its reply must match `json_schema`."""

    model: ModelSpec
    rubric: PromptTemplate = Field(
        description="fields: the dataset's columns, `prediction` (the target's answer) and `reference` (the value of "
        "the dataset's reference_field)"
    )
    json_schema: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_JUDGE_SCHEMA))
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=32))


class BaselineConfig(StrictModel):
    """What a target is compared with: a previous run's scores file, the last passing run of this
    evaluation (found through Prefect), or another target of this run."""

    scores: str | None = Field(None, description="fsspec URL of a previous run's scores.jsonl")
    last_run: bool = Field(False, description="the scores of the last run of this evaluation that passed its gate")
    target: str | None = Field(None, description="another target of this run (e.g. the current endpoint)")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    storage_block: str | None = storage_block_field()

    @model_validator(mode="after")
    def _one_source(self) -> BaselineConfig:
        given = [name for name in ("scores", "target") if getattr(self, name)] + (["last_run"] if self.last_run else [])
        if len(given) != 1:
            raise ValueError(f"give exactly one of scores, last_run or target (got {', '.join(given) or 'none'})")
        return self


class EvaluationConfig(OutputJobConfig):
    """One evaluation: every target answers every example, then scores, baseline deltas and a gate.

    Example:
        ```yaml
        name: colours
        dataset: {path: s3://bucket/eval.jsonl, id_field: id}
        output: s3://bucket/evals/colours/
        targets:
          - {name: tiny, model: {source: ./models/tiny}}
        metrics: [{type: exact_match}, {type: latency}]
        gate: {min: {exact_match: 0.8}}
        ```
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the evaluation across runs (baseline lookup)")
    dataset: EvalDataset
    targets: list[EvalTarget] = Field(min_length=1)
    prompt: PromptTemplate = Field(
        default_factory=lambda: PromptTemplate(user="{{ input }}"), description="the question as the target sees it"
    )
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=64))
    metrics: list[MetricSpec] = Field(min_length=1)
    judge: JudgeConfig | None = None
    baseline: BaselineConfig | None = None
    gate: GateConfig = Field(default_factory=GateConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        check_metric_names(self.metrics)
        names = [t.name for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"target names must be unique; repeated: {', '.join(repeated)}")
        judged = any(isinstance(m, JudgeMetric) for m in self.metrics)
        if judged and self.judge is None:
            raise ValueError("a metric of type 'judge' needs the judge section (model and rubric)")
        if self.judge is not None and not judged:
            raise ValueError("judge is configured but no metric of type 'judge' uses it; add {type: judge}")
        if self.judge is not None and rubric_uses_reference(self.judge.rubric):
            field = self.dataset.reference_field
            if field is None:
                raise ValueError(
                    f"judge.rubric uses {REFERENCE_FIELD!r}, but dataset.reference_field is null; set it to the column "
                    "holding the expected answer"
                )
            if not field.isidentifier():
                raise ValueError(
                    f"judge.rubric uses {REFERENCE_FIELD!r}, but dataset.reference_field {field!r} is not a name a "
                    "template can read; rename that column"
                )
        check_gate_metrics(self.gate, [m.name for m in self.metrics])
        if self.baseline and self.baseline.target and self.baseline.target not in names:
            raise ValueError(f"baseline.target {self.baseline.target!r} is not a target (targets: {', '.join(names)})")
        return self

    def target_folder(self, target: str) -> str:
        return f"{self.output.rstrip('/')}/targets/{_slug(target)}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def rubric_uses_reference(rubric: PromptTemplate) -> bool:
    """Whether a judge rubric reads `reference` (the dataset's reference_field, under that name)."""
    return any(REFERENCE_FIELD in fields for fields in template_fields(rubric).values())


def judge_rubric(config: EvaluationConfig) -> PromptTemplate:
    """The rubric as the judge renders it over the target's answers (the dataset's columns plus
    `prediction`): where it reads `reference`, that name is bound to the reference_field's column.

    Example (reference_field `answer`):
        user: "Expected {{ reference }}; got {{ prediction }}"
        -> user: "{% set reference = answer %}Expected {{ reference }}; got {{ prediction }}"
    """
    assert config.judge is not None
    rubric, field = config.judge.rubric, config.dataset.reference_field
    if field is None or field == REFERENCE_FIELD or not rubric_uses_reference(rubric):
        return rubric
    uses = template_fields(rubric)
    bind = "{% set " + REFERENCE_FIELD + " = " + field + " %}"
    parts = {
        part: bind + text if REFERENCE_FIELD in uses.get(part, set()) else text for part, text in rubric.model_dump().items()
    }
    return PromptTemplate.model_validate(parts)
