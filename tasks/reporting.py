"""What a run shows in the Prefect UI: summary tables, markdown reports and events."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest


def artifact_key(kind: str, location: str) -> str:
    """A stable artifact key per job output, so the UI keeps a version history per job."""
    location = location.rstrip("/")
    slug = re.sub(r"[^a-z0-9]+", "-", location.lower()).strip("-")[-40:].strip("-")
    digest = hashlib.sha256(location.encode()).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}".strip("-")


def batch_summary_rows(manifest: Manifest) -> list[dict[str, Any]]:
    counts, throughput, latency = manifest.counts, manifest.throughput, manifest.throughput.latency_s
    rows = [
        ("rows", counts.total),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("error rate", f"{counts.error_rate:.2%} (max {manifest.max_error_rate:.2%})"),
        ("rows/s", throughput.rows_per_s),
        ("output tokens/s", throughput.output_tokens_per_s),
        ("tokens in / out", f"{throughput.tokens_in:,} / {throughput.tokens_out:,}"),
        ("latency p50 / p90 / p99 (s)", f"{latency['p50']} / {latency['p90']} / {latency['p99']}"),
        ("wall (s)", manifest.timings.wall_s),
        ("first result after (s)", manifest.timings.first_result_s),
        ("attempts (rows each)", ", ".join(str(int(a["rows"])) for a in manifest.attempts)),
        ("model", _model_label(manifest)),
    ]
    rows += [(f"errors: {code}", count) for code, count in counts.errors_by_code.items()]
    return [{"metric": name, "value": str(value)} for name, value in rows]


def _model_label(manifest: Manifest) -> str:
    if "steps" in manifest.model:
        return " -> ".join(f"{s['name']}: {s['source']}" for s in manifest.model["steps"])
    return f"{manifest.model['name']} ({manifest.model['engine']})"


def batch_report_markdown(manifest: Manifest) -> str:
    counts = manifest.counts
    verdict = "within" if counts.error_rate <= manifest.max_error_rate else "**above**"
    lines = [
        f"# {manifest.job.capitalize()}: {_model_label(manifest)}",
        "",
        f"{counts.completed:,} of {counts.total:,} rows completed, {counts.failed:,} failed "
        f"({counts.error_rate:.2%}, {verdict} the {manifest.max_error_rate:.2%} limit).",
        "",
        "| output | location |",
        "| --- | --- |",
        *[f"| {name} | `{url}` |" for name, url in manifest.outputs.items()],
        "",
        f"Input: `{manifest.input['url']}` ({manifest.input['format']}).  ",
        f"Throughput: {manifest.throughput.rows_per_s} rows/s, "
        f"{manifest.throughput.output_tokens_per_s} output tokens/s over {manifest.timings.wall_s} s.",
    ]
    if manifest.steps:
        lines += ["", "| step | rows | errors | tokens in | tokens out |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['rows']} | {s['errors']} | {s['tokens_in']} | {s['tokens_out']} |" for s in manifest.steps]
    if counts.errors_by_code:
        lines += ["", "| error code | rows |", "| --- | --- |"]
        lines += [f"| {code} | {count} |" for code, count in counts.errors_by_code.items()]
    versions = ", ".join(f"{k} {v}" for k, v in manifest.versions.items() if v)
    lines += ["", f"<sub>{versions}</sub>"]
    return "\n".join(lines)


def step_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Per chain step: rows it finished, rows that failed in it, tokens, and rows/s over the run."""
    wall = manifest.timings.wall_s or 1e-6
    return [
        {
            "step": step["name"],
            "model": step["source"],
            "rows": step["rows"],
            "errors": step["errors"],
            "tokens in": step["tokens_in"],
            "tokens out": step["tokens_out"],
            "rows/s": round(step["rows"] / wall, 3),
        }
        for step in manifest.steps or []
    ]


@task(name="publish-batch-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_batch_report(manifest: Manifest) -> None:
    """Summary table and markdown report artifacts for one batch run."""
    _publish_report(manifest, "batch", "Batch run")


@task(name="publish-chain-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_chain_report(manifest: Manifest) -> None:
    """Summary, per-step table and markdown report artifacts for one chain run."""
    _publish_report(manifest, "chain", "Chain run")
    output = manifest.outputs["manifest"].rsplit("/", 1)[0]
    create_table_artifact(step_rows(manifest), key=artifact_key("chain-steps", output), description="Chain steps")


def _publish_report(manifest: Manifest, kind: str, title: str) -> None:
    output = manifest.outputs["manifest"].rsplit("/", 1)[0]
    create_table_artifact(
        batch_summary_rows(manifest), key=artifact_key(f"{kind}-summary", output), description=f"{title} summary"
    )
    create_markdown_artifact(
        batch_report_markdown(manifest), key=artifact_key(f"{kind}-report", output), description=f"{title} report"
    )


class ErrorRateExceeded(RuntimeError):
    """More rows failed than the job allows; results and errors were written first."""


def conclude_job(kind: str, output: str, manifest: Manifest, max_error_rate: float) -> None:
    """Emit `rayllm.<kind>.completed`, or `.failed` and raise when too many rows failed."""
    payload = {
        "counts": manifest.counts.model_dump(),
        "outputs": manifest.outputs,
        "model": manifest.model,
        "steps": manifest.steps,
    }
    counts = manifest.counts
    if counts.error_rate > max_error_rate:
        emit_job_event(kind, "failed", output, {**payload, "reason": "error rate above max_error_rate"})
        raise ErrorRateExceeded(
            f"{counts.failed} of {counts.total} rows failed ({counts.error_rate:.2%}), "
            f"above max_error_rate {max_error_rate:.2%}; see {manifest.outputs['errors']}"
        )
    emit_job_event(kind, "completed", output, payload)


def job_failed_hook(job: str):
    """A flow `on_failure` hook emitting `rayllm.<job>.failed` about the run's `config.output`, with
    the reason, for flows that do not emit it themselves: `@flow(on_failure=[job_failed_hook("curation")])`."""

    def hook(flow, flow_run, state) -> None:
        config = (flow_run.parameters or {}).get("config") or {}
        output = config.get("output") if isinstance(config, dict) else getattr(config, "output", None)
        emit_job_event(job, "failed", str(output or "unknown"), {"reason": (state.message or "")[:2000]})

    return hook


def emit_job_event(job: str, outcome: str, output: str, payload: dict[str, Any]) -> None:
    """`rayllm.<job>.<outcome>` about the job's output location, for automations to chain on."""
    output = output.rstrip("/")
    emit_event(
        event=f"rayllm.{job}.{outcome}",
        resource={"prefect.resource.id": f"rayllm.{job}.{output}", "prefect.resource.name": output},
        payload=payload,
    )
