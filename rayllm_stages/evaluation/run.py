"""Evaluation without Prefect: targets answer the dataset, a judge grades, examples are scored and
compared with a baseline, and a gate decides.

    dataset --[answer chain per target]--> targets/<t>/answers/{results,errors}.jsonl
            --[judge chain, optional]-->   targets/<t>/judge/{results,errors}.jsonl
            --> records (one per example, failed ones included) --> scores, summaries
            --> baseline deltas, verdicts --> scores.jsonl, metrics.json, report.md, plots/

The answer and judge runs are chains (`prefect_rayllm.rayllm_stages.jobs.chain`), so they resume, record per-row
errors with their reason, and carry tokens and latency per example. A target that fails an
example (timeout, HTTP 5xx, prompt too long) leaves it in the errors file; it is scored as failed
and stays in the denominator. A judge reply that fails its schema is a judge error, not a zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from prefect_rayllm.rayllm_stages.config.base import ConfigError, InputUnavailable
from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
from prefect_rayllm.rayllm_stages.evaluation.config import (
    JUDGEMENT_COLUMN,
    PREDICTION_COLUMN,
    REFERENCE_FIELD,
    EvalTarget,
    EvaluationConfig,
    judge_rubric,
)
from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample, missing_references, quality_metric_names, score_example
from prefect_rayllm.rayllm_stages.evaluation.report import render_markdown, render_plots
from prefect_rayllm.rayllm_stages.evaluation.stats import (
    MetricDelta,
    TargetSummary,
    Verdict,
    apply_gate,
    compare,
    scores_from_jsonl,
    scores_to_jsonl,
    summarize,
)
from prefect_rayllm.rayllm_stages.io.batch_input import RowError, check_table_input, keyed_table_rows, table_columns
from prefect_rayllm.rayllm_stages.io.batch_output import ROW_ID_FIELD
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
from prefect_rayllm.rayllm_stages.llm.prompts import template_fields

ANSWER_STEP = "answer"
JUDGE_STEP = "judge"


class EvaluationResult(BaseModel):
    """The typed outcome of one evaluation run (the flow's return value)."""

    name: str
    passed: bool
    verdicts: dict[str, Verdict]
    summaries: dict[str, TargetSummary]
    deltas: dict[str, dict[str, MetricDelta]] = Field(default_factory=dict)
    baseline: str | None = Field(None, description="where the baseline came from")
    outputs: dict[str, str] = Field(default_factory=dict)


# -- the chains each target runs -------------------------------------------------------------
def answer_chain_config(config: EvaluationConfig, target: EvalTarget) -> ChainJobConfig:
    return ChainJobConfig(
        input=config.dataset.path,
        output=f"{config.target_folder(target.name)}/answers",
        input_format=config.dataset.format,
        id_column=config.dataset.id_field,
        steps=[
            {
                "name": ANSWER_STEP,
                "model": target.model,
                "prompt": config.prompt,
                "sampling": config.sampling,
                "output_column": PREDICTION_COLUMN,
            }
        ],
        max_error_rate=1.0,  # a failed example is a score, not a reason to stop
        ray_address=config.ray_address,
        ray_block=config.ray_block,
        storage_options=config.storage_options,
        storage_block=config.storage_block,
        commit_every_rows=config.commit_every_rows,
    )


def judge_chain_config(config: EvaluationConfig, target: EvalTarget) -> ChainJobConfig | None:
    """The judge grades the target's answers (its results file); None without a judge."""
    if config.judge is None:
        return None
    answers = answer_chain_config(config, target).output
    return ChainJobConfig(
        input=f"{answers}/results.jsonl",
        output=f"{config.target_folder(target.name)}/judge",
        input_format="jsonl",
        id_column=ROW_ID_FIELD,  # the answers' row ids: the dataset's ids or row numbers
        steps=[
            {
                "name": JUDGE_STEP,
                "model": config.judge.model,
                "prompt": judge_rubric(config),
                "sampling": config.judge.sampling,
                "output_column": JUDGEMENT_COLUMN,
                "parse": "json",
                "json_schema": config.judge.json_schema,
            }
        ],
        max_error_rate=1.0,
        ray_address=config.ray_address,
        ray_block=config.ray_block,
        storage_options=config.storage_options,
        storage_block=config.storage_block,
        commit_every_rows=config.commit_every_rows,
    )


# -- checks before any engine starts ---------------------------------------------------------
def check_evaluation(config: EvaluationConfig) -> int:
    """Check the dataset against the config; returns the number of examples.

    Raises:
        ConfigError: the dataset is missing, a field is absent, the prompt uses an unknown column,
            or examples lack the reference a metric needs (their ids named).
    """
    dataset = config.dataset
    source = Location(dataset.path, config.storage_options)
    answer_config = answer_chain_config(config, config.targets[0])
    fmt = ChainJob(answer_config).check_input()  # format, id column, template fields (named)
    if config.judge is not None:
        dataset_columns = set(table_columns(source, fmt))
        columns = dataset_columns | {PREDICTION_COLUMN} | ({REFERENCE_FIELD} if dataset.reference_field else set())
        for part, fields in template_fields(config.judge.rubric).items():
            unknown = sorted(fields - columns)
            if unknown:
                raise ConfigError(
                    f"judge.rubric.{part} uses {', '.join(map(repr, unknown))}, which is neither a dataset column "
                    f"nor {PREDICTION_COLUMN!r} or {REFERENCE_FIELD!r} (columns: {', '.join(sorted(columns))})"
                )
            if REFERENCE_FIELD in fields and dataset.reference_field not in dataset_columns:
                raise ConfigError(
                    f"judge.rubric.{part} uses {REFERENCE_FIELD!r}, but {dataset.path} has no column "
                    f"{dataset.reference_field!r} (dataset.reference_field)"
                )
    examples = list(_dataset_examples(config, source, fmt))
    if not examples:
        raise ConfigError(f"dataset.path: {dataset.path} has no examples")
    lacking = missing_references(config.metrics, [e for e in examples if "error" not in e])
    if lacking:
        shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
        raise ConfigError(
            f"dataset.reference_field {dataset.reference_field!r}: {len(lacking)} example(s) lack a usable "
            f"reference that a metric needs: {shown}"
        )
    return len(examples)


def _dataset_examples(config: EvaluationConfig, source: Location, fmt: str):
    """The dataset's examples as record skeletons (id, input, reference, tags); unreadable rows
    become failed examples with the reason."""
    dataset = config.dataset
    for item in keyed_table_rows(source, fmt, dataset.id_field):
        if isinstance(item, RowError):
            yield {"id": item.key or f"row-{item.index}", "input": "", "reference": None, "tags": [], "error": item.message}
            continue
        _, key, row = item
        yield {
            "id": key,
            "input": _text(row.get(dataset.input_field)),
            "reference": _text(row.get(dataset.reference_field)) if dataset.reference_field else None,
            "tags": _tags(row.get(dataset.tags_field)) if dataset.tags_field else [],
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tags(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


# -- records: the dataset joined with what the target and judge did ---------------------------
def collect_records(config: EvaluationConfig, target: EvalTarget) -> list[dict[str, Any]]:
    """One record per dataset example: prediction or error, tokens, latency, judgement or judge error."""
    answer_config = answer_chain_config(config, target)
    answers = _chain_outputs(answer_config, config)
    judge_config = judge_chain_config(config, target)
    judged = _chain_outputs(judge_config, config) if judge_config else ({}, {})
    source = Location(config.dataset.path, config.storage_options)
    records = []
    for example in _dataset_examples(config, source, check_table_input(answer_config)):
        key = example["id"]
        result, error = answers[0].get(key), answers[1].get(key)
        record = {
            **example,
            "prediction": None,
            "latency_s": None,
            "num_input_tokens": 0,
            "num_generated_tokens": 0,
            "judge": None,
            "judge_error": "",
        }
        if "error" in example:
            pass
        elif result is not None:
            usage = (result.get("_usage") or {}).get(ANSWER_STEP) or {}
            record.update(
                prediction=result.get(PREDICTION_COLUMN) or "",
                error="",
                latency_s=usage.get("latency_s"),
                num_input_tokens=usage.get("in", 0),
                num_generated_tokens=usage.get("out", 0),
            )
            if judge_config is not None:
                verdict, judge_error = judged[0].get(key), judged[1].get(key)
                record["judge"] = verdict.get(JUDGEMENT_COLUMN) if verdict else None
                record["judge_error"] = judge_error or ("" if verdict else "no judge reply")
        else:
            record["error"] = error or "no answer recorded"
        records.append(record)
    return records


def _chain_outputs(chain: ChainJobConfig, config: EvaluationConfig) -> tuple[dict[str, dict], dict[str, str]]:
    """(results by id, error message by id) of a finished chain."""
    folder = Location(chain.output, config.storage_options)
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    id_field = config.dataset.id_field
    results_file, errors_file = folder.child("results.jsonl"), folder.child("errors.jsonl")
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            key = row.get(ROW_ID_FIELD, row.get(id_field) if id_field else None)
            if key is None:
                raise ConfigError(
                    f"{results_file.url}: a result has no {ROW_ID_FIELD!r}; it was written by an older "
                    f"version: rerun with overwrite"
                )
            results[str(key)] = row
    if errors_file.exists():
        for line in errors_file.read_text().splitlines():
            row = json.loads(line)
            key = row.get("row_id") if row.get("row_id") is not None else f"row-{row.get('row_index')}"
            errors[str(key)] = row["error"]["message"]
    return results, errors


# -- scores, baseline, gate -------------------------------------------------------------------
def score_records(config: EvaluationConfig, records: list[Mapping[str, Any]]) -> list[ScoredExample]:
    return [score_example(config.metrics, record) for record in records]


def conclude(
    config: EvaluationConfig,
    scored: Mapping[str, list[ScoredExample]],
    baseline: Mapping[str, list[ScoredExample]] | None,
    baseline_source: str | None,
) -> EvaluationResult:
    """Summaries, deltas against the baseline (per target), and the gate's verdicts."""
    summaries = {name: summarize(name, examples, config.bootstrap) for name, examples in scored.items()}
    deltas: dict[str, dict[str, MetricDelta]] = {}
    verdicts: dict[str, Verdict] = {}
    for name, examples in scored.items():
        previous = _baseline_for(name, baseline)
        if previous is not None:
            deltas[name] = compare(examples, previous, config.bootstrap)
        verdicts[name] = apply_gate(config.gate, summaries[name], deltas.get(name))
    return EvaluationResult(
        name=config.name,
        passed=all(v.passed for v in verdicts.values()),
        verdicts=verdicts,
        summaries=summaries,
        deltas=deltas,
        baseline=baseline_source,
    )


def _baseline_for(target: str, baseline: Mapping[str, list[ScoredExample]] | None) -> list[ScoredExample] | None:
    """The same target's previous scores; a single-target baseline stands for every target."""
    if not baseline:
        return None
    if target in baseline:
        return baseline[target]
    return next(iter(baseline.values())) if len(baseline) == 1 else None


def read_scores(url: str, storage_options: dict[str, Any]) -> dict[str, list[ScoredExample]]:
    location = Location(url, storage_options)
    if not location.exists():
        raise InputUnavailable(f"baseline.scores: {url} does not exist")
    try:
        return scores_from_jsonl(location.read_text())
    except ValueError as exc:
        raise ConfigError(f"baseline.scores: {url}: {exc}") from None


def write_outputs(
    config: EvaluationConfig, result: EvaluationResult, scored: Mapping[str, list[ScoredExample]]
) -> dict[str, str]:
    """scores.jsonl, metrics.json, report.md and plots/*.png in the output folder; returns their URLs."""
    output = Location(config.output, config.storage_options)
    scores_file, metrics_file, report_file = output.child("scores.jsonl"), output.child("metrics.json"), output.child("report.md")
    scores_file.write_text("".join(scores_to_jsonl(name, examples) for name, examples in scored.items()))
    plots = render_plots(
        list(result.summaries.values()), scored, result.deltas, quality_metrics=quality_metric_names(config.metrics)
    )
    outputs = {"scores": scores_file.url, "metrics": metrics_file.url, "report": report_file.url}
    for filename, png in plots.items():
        plot = output.child("plots", filename)
        plot.write_bytes(png)
        outputs[f"plot:{filename}"] = plot.url
    result.outputs = outputs
    metrics_file.write_json(result.model_dump(mode="json"))
    report_file.write_text(report_markdown(result))
    return outputs


def report_markdown(result: EvaluationResult) -> str:
    title = f"# Evaluation `{result.name}`: {'passed' if result.passed else 'FAILED'}\n\n"
    baseline = f"Baseline: {result.baseline}\n\n" if result.baseline else "No baseline.\n\n"
    return title + baseline + render_markdown(list(result.summaries.values()), list(result.verdicts.values()), result.deltas)
