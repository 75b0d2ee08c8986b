"""Evaluation tasks: check the dataset, score a target, find the baseline, publish the report."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.events import emit_event

from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample
from prefect_rayllm.rayllm_stages.evaluation.run import (
    EvaluationResult,
    check_evaluation,
    collect_records,
    read_scores,
    report_markdown,
    score_records,
)
from prefect_rayllm.tasks.batch import STORAGE_RETRIES
from prefect_rayllm.tasks.blocks import with_storage_credentials
from prefect_rayllm.tasks.reporting import artifact_key


class GateFailed(RuntimeError):
    """The evaluation gate failed; scores, metrics and the report were written first."""


@task(name="check-evaluation", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def check_evaluation_input(config: EvaluationConfig) -> int:
    """Check the dataset against metrics, prompt and targets before any engine starts."""
    examples = check_evaluation(with_storage_credentials(config))
    get_run_logger().info(
        "evaluation %s: %d examples, targets: %s", config.name, examples, ", ".join(t.name for t in config.targets)
    )
    return examples


@task(name="score-target", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def score_target(config: EvaluationConfig, target: str) -> list[ScoredExample]:
    """Join the dataset with the target's answers and judgements, and score every example.

    Plain Python over files in the output location; the `evaluate` flow runs one per target in
    its own process (no Ray worker, so no Prefect API is needed anywhere but here).
    """
    (spec,) = [t for t in config.targets if t.name == target]
    resolved = with_storage_credentials(config)
    scored = score_records(resolved, collect_records(resolved, spec))
    failed = sum(1 for s in scored if s.error)
    judge_errors = sum(1 for s in scored if s.judge_error)
    get_run_logger().info("target %s: %d examples scored (%d failed, %d judge errors)", target, len(scored), failed, judge_errors)
    return scored


@task(name="load-baseline", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def load_baseline(config: EvaluationConfig) -> tuple[dict[str, list[ScoredExample]] | None, str | None]:
    """The baseline's scores per target and where they came from (None: no baseline yet)."""
    config = with_storage_credentials(config)
    baseline = config.baseline
    if baseline is None or baseline.target:
        return None, None  # a target of this run: compared after scoring
    url = baseline.scores or _last_passing_scores_url(config.name)
    if url is None:
        get_run_logger().info("no earlier passing run of evaluation %s: no baseline", config.name)
        return None, None
    return read_scores(url, baseline.storage_options or config.storage_options), url


def baseline_key(name: str) -> str:
    """The artifact that points at the scores of the last run of `name` that passed its gate."""
    return "eval-baseline-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _last_passing_scores_url(name: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    context = FlowRunContext.get()
    current = context.flow_run.id if context and context.flow_run else None
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[baseline_key(name)])),
            sort=ArtifactSort.CREATED_DESC,
            limit=20,
        )
    for artifact in artifacts:
        if artifact.flow_run_id == current:
            continue
        rows: Any = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        return rows[0]["scores"]
    return None


@task(name="publish-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_evaluation(config: EvaluationConfig, result: EvaluationResult) -> None:
    """Report (markdown with plots), verdict table, plot images, the baseline pointer when the gate
    passed, and the event `rayllm.evaluation.completed` carrying the verdict."""
    output = config.output.rstrip("/")
    create_markdown_artifact(
        report_markdown(result) + _embedded_plots(config, result),
        key=artifact_key("eval-report", output),
        description=f"Evaluation {config.name}",
    )
    create_table_artifact(_verdict_rows(result), key=artifact_key("eval-verdict", output), description="Gate checks")
    for name, url in result.outputs.items():
        link = _browser_url(config, url) if name.startswith("plot:") else None
        if link is not None:
            create_image_artifact(link, description=name[len("plot:") :])
    if result.passed:
        create_table_artifact(
            [{"scores": result.outputs["scores"], "metrics": result.outputs["metrics"]}],
            key=baseline_key(config.name),
            description=f"Scores of the last passing run of evaluation {config.name} (the next run's baseline)",
        )
    emit_event(
        event="rayllm.evaluation.completed",
        resource={
            "prefect.resource.id": f"rayllm.evaluation.{config.name}",
            "prefect.resource.name": config.name,
            # A label, because automations match labels, not payloads: `rayllm.gate: passed`.
            "rayllm.gate": "passed" if result.passed else "failed",
        },
        payload={
            "passed": result.passed,
            "targets": {target.name: target.model.source for target in config.targets},
            "verdicts": {name: verdict.model_dump(mode="json") for name, verdict in result.verdicts.items()},
            "outputs": {k: v for k, v in result.outputs.items() if not k.startswith("plot:")},
            "baseline": result.baseline,
        },
    )


def _verdict_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    rows = []
    for target, verdict in result.verdicts.items():
        for check in verdict.checks:
            rows.append(
                {
                    "target": target,
                    "check": check.name,
                    "threshold": check.threshold,
                    "value": check.value,
                    "passed": check.passed,
                    "detail": check.detail,
                }
            )
        if not verdict.checks:
            rows.append({"target": target, "check": "(no gate)", "threshold": None, "value": None, "passed": True, "detail": ""})
    return rows


PRESIGNED_URL_SECONDS = 7 * 24 * 3600


def _browser_url(config: EvaluationConfig, url: str) -> str | None:
    """A URL a browser can open for an image artifact: http(s) as it is, object storage presigned
    (a week), None for a local file or a store that cannot sign (the report embeds the plot)."""
    from prefect_rayllm.rayllm_stages.io.storage import Location

    if url.startswith(("http://", "https://")):
        return url
    location = Location(url, with_storage_credentials(config).storage_options)
    if location.is_local:
        return None
    try:
        return str(location.fs.sign(location.path, expiration=PRESIGNED_URL_SECONDS))
    except (NotImplementedError, AttributeError, ValueError):
        return None


def _embedded_plots(config: EvaluationConfig, result: EvaluationResult) -> str:
    """The plots inline (data URLs), so the report reads whole in the Prefect UI wherever the
    output folder lives."""
    from prefect_rayllm.rayllm_stages.io.storage import Location

    parts = []
    options = with_storage_credentials(config).storage_options
    for name, url in result.outputs.items():
        if name.startswith("plot:"):
            with Location(url, options).open("rb") as handle:
                encoded = base64.b64encode(handle.read()).decode()
            parts.append(f"![{name[len('plot:') :]}](data:image/png;base64,{encoded})")
    return "\n\n## Plots\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def gate_failure_message(result: EvaluationResult) -> str:
    failed = [
        f"{target}: " + "; ".join(c.detail or c.name for c in verdict.checks if not c.passed)
        for target, verdict in result.verdicts.items()
        if not verdict.passed
    ]
    return f"evaluation {result.name} failed its gate: " + " | ".join(failed) + f" (report: {result.outputs.get('report')})"


@task(name="write-evaluation", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_evaluation(
    config: EvaluationConfig, result: EvaluationResult, scored: dict[str, list[ScoredExample]]
) -> EvaluationResult:
    """scores.jsonl, metrics.json, report.md and plots in the output folder."""
    from prefect_rayllm.rayllm_stages.evaluation.run import write_outputs

    write_outputs(with_storage_credentials(config), result, scored)
    return result
