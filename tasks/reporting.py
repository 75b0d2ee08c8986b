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
from prefect_rayllm.rayllm_stages.runtime.engine_stats import efficiency_line
from prefect_rayllm.tasks.charts import line_chart_svg, svg_markdown


def artifact_key(kind: str, location: str) -> str:
    """A stable artifact key per job output, so the UI keeps a version history per job."""
    location = location.rstrip("/")
    slug = re.sub(r"[^a-z0-9]+", "-", location.lower()).strip("-")[-40:].strip("-")
    digest = hashlib.sha256(location.encode()).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}".strip("-")


def batch_summary_rows(manifest: Manifest) -> list[dict[str, Any]]:
    counts, throughput, latency = manifest.counts, manifest.throughput, manifest.throughput.latency_s
    rates = steady(manifest)
    rows = [
        ("rows", counts.total),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("error rate", f"{counts.error_rate:.2%} (max {_error_limit(manifest):.2%})"),
        ("rows/s", throughput.rows_per_s),
        ("output tokens/s", throughput.output_tokens_per_s),
        ("tokens in / out", f"{throughput.tokens_in:,} / {throughput.tokens_out:,}"),
        ("latency p50 / p90 / p99 (s)", f"{latency['p50']} / {latency['p90']} / {latency['p99']}"),
        ("wall (s)", manifest.timings.wall_s),
        ("first result after (s)", manifest.timings.first_result_s),
        *[(f"engine: {step} first request after (s)", at) for step, at in engine_first_requests(manifest).items()],
        ("steady rows/s (first result -> last)", rates["rows_per_s"]),
        ("steady output tokens/s", rates["output_tokens_per_s"]),
        ("attempts (rows each)", ", ".join(str(int(a["rows"])) for a in manifest.attempts)),
        ("model", _model_label(manifest)),
    ]
    rows += [(f"errors: {code}", count) for code, count in counts.errors_by_code.items()]
    # How full each vLLM engine was, and its decode rate against the GPU's bandwidth roofline.
    rows += [(f"engine: {step}", efficiency_line(report)) for step, report in (manifest.engine or {}).items()]
    return [{"metric": name, "value": str(value)} for name, value in rows]


def steady(manifest: Manifest) -> dict[str, float | None]:
    """Rows/s and output tokens/s from the first result to the last: the rate once the engine
    runs, without its start (the whole-run figures include it)."""
    first, wall = manifest.timings.first_result_s, manifest.timings.wall_s
    if first is None or wall - first <= 0 or manifest.counts.completed < 2:
        return {"rows_per_s": None, "output_tokens_per_s": None}
    span = wall - first
    share = (manifest.counts.completed - 1) / manifest.counts.completed  # the first result's rows arrived at `first`
    return {
        "rows_per_s": round((manifest.counts.completed - 1) / span, 3),
        "output_tokens_per_s": round(manifest.throughput.tokens_out * share / span, 1),
    }


def engine_first_requests(manifest: Manifest) -> dict[str, float]:
    """Per vLLM step: seconds from the job's start to the engine's first request (engine start
    included)."""
    return {
        step: round(report["first_request_at"] - manifest.timings.started_at, 1)
        for step, report in (manifest.engine or {}).items()
        if report.get("first_request_at")
    }


def timeline_markdown(manifest: Manifest) -> list[str]:
    """Start-up apart from steady throughput, and each engine's decode rate and running requests
    over time as inline charts."""
    rates = steady(manifest)
    lines = ["", "## Timeline", ""]
    for step, at in engine_first_requests(manifest).items():
        lines.append(f"- engine `{step}`: first request {at} s after the job started (engine start included)")
    if manifest.timings.first_result_s is not None:
        lines.append(f"- first result: {manifest.timings.first_result_s} s after the run started")
    if rates["rows_per_s"] is not None:
        lines.append(
            f"- steady (first result -> last): {rates['rows_per_s']} rows/s, {rates['output_tokens_per_s']} output tokens/s"
        )
    for step, report in (manifest.engine or {}).items():
        series = report.get("series") or {}
        if len(series.get("t_s") or []) >= 2:
            chart = line_chart_svg(
                series["t_s"],
                {"decode tok/s": series.get("decode_tokens_per_s", []), "running": series.get("running", [])},
                f"engine {step}: decode tokens/s and running requests",
                x_label="s after its first request",
            )
            lines += ["", svg_markdown(f"engine {step} over time", chart)]
    return lines


def _model_label(manifest: Manifest) -> str:
    if "steps" in manifest.model:
        return " -> ".join(f"{s['name']}: {s['source']}" for s in manifest.model["steps"])
    return f"{manifest.model['name']} ({manifest.model['engine']})"


def _error_limit(manifest: Manifest) -> float:
    return manifest.max_error_rate if manifest.max_error_rate is not None else 1.0


def batch_report_markdown(manifest: Manifest) -> str:
    counts = manifest.counts
    limit = _error_limit(manifest)
    verdict = "within" if counts.error_rate <= limit else "**above**"
    lines = [
        f"# {manifest.job.capitalize()}: {_model_label(manifest)}",
        "",
        f"{counts.completed:,} of {counts.total:,} rows completed, {counts.failed:,} failed "
        f"({counts.error_rate:.2%}, {verdict} the {limit:.2%} limit).",
        "",
        "| output | location |",
        "| --- | --- |",
        *[f"| {name} | `{url}` |" for name, url in manifest.outputs.items()],
        "",
        f"Input: `{manifest.input['url']}` ({manifest.input['format']}).  ",
        f"Throughput over the whole run, start-up included: {manifest.throughput.rows_per_s} rows/s, "
        f"{manifest.throughput.output_tokens_per_s} output tokens/s over {manifest.timings.wall_s} s.",
    ]
    lines += [f"Engine ({step}): {efficiency_line(report)}.  " for step, report in (manifest.engine or {}).items()]
    lines += timeline_markdown(manifest)
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


class JobFailed(RuntimeError):
    """A job failure that says which event tells it: `rayllm.<job>.<outcome>` with `payload`.

    The flows' `on_failure` hook (`job_failed_hook`) emits it; any other exception that fails a
    flow run becomes `rayllm.<job>.failed` with the reason.
    """

    outcome = "failed"

    def __init__(self, message: str, payload: dict[str, Any]):
        super().__init__(message)
        self.message, self.payload = message, payload

    def __reduce__(self):  # keep the payload when Prefect pickles the exception
        return type(self), (self.message, self.payload)


class ErrorRateExceeded(JobFailed):
    """More rows failed than the job allows; results and errors were written first."""


def job_event_payload(manifest: Manifest) -> dict[str, Any]:
    """What `rayllm.<job>.completed` (and the error-rate `.failed`) carry about a run."""
    if manifest.curation is not None:
        counts = manifest.counts
        return {
            "input": counts.total,
            "curated": counts.completed,
            "rejected": counts.failed,
            "rejected_by_stage": manifest.curation.rejected_by_stage,
            "outputs": manifest.outputs,
        }
    return {
        "counts": manifest.counts.model_dump(),
        "outputs": manifest.outputs,
        "model": manifest.model,
        "steps": manifest.steps,
    }


def conclude_job(kind: str, output: str, manifest: Manifest, max_error_rate: float | None) -> None:
    """Emit `rayllm.<kind>.completed`, or raise `ErrorRateExceeded` (the flow's failure hook then
    emits `.failed` with the counts) when too many rows failed. `max_error_rate` None: no limit."""
    payload = job_event_payload(manifest)
    counts = manifest.counts
    if max_error_rate is not None and counts.error_rate > max_error_rate:
        raise ErrorRateExceeded(
            f"{counts.failed} of {counts.total} rows failed ({counts.error_rate:.2%}), "
            f"above max_error_rate {max_error_rate:.2%}; see {manifest.outputs['errors']}",
            {**payload, "reason": "error rate above max_error_rate"},
        )
    emit_job_event(kind, "completed", output, payload)


def job_failed_hook(job: str, key: str = "output", resource: str | None = None, unknown: str = "unknown"):
    """The one way a job's failure becomes an event: a flow `on_failure` hook.

    It emits `rayllm.<job>.failed` about `config.<key>` (the run's output; evaluation: its name;
    rollout: its endpoint) with the reason, whatever failed the run (parameters, input, engine,
    error rate, gate). A `JobFailed` exception names its own outcome and payload instead
    (`ErrorRateExceeded`: the counts; a rolled-back rollout: `rayllm.rollout.rolled_back`).
    `resource` replaces `<job>` in the resource id (rollout: `rayllm.endpoint.<endpoint>`).

    Example: `@flow(on_failure=[job_failed_hook("curation")])`.
    """

    def hook(flow, flow_run, state) -> None:
        config = (flow_run.parameters or {}).get("config") or {}
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        error = _exception_of(state)
        if isinstance(error, JobFailed):
            outcome, payload = error.outcome, error.payload
        else:
            reason = f"{type(error).__name__}: {error}" if error is not None else (state.message or "")
            outcome, payload = "failed", {"reason": reason[:2000]}
        emit_job_event(job, outcome, str(value or unknown), payload, resource=resource)

    return hook


def _exception_of(state) -> BaseException | None:
    """The exception that failed the run, when the state holds one."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:
        return None
    return result if isinstance(result, BaseException) else None


def emit_job_event(job: str, outcome: str, output: str, payload: dict[str, Any], resource: str | None = None) -> None:
    """`rayllm.<job>.<outcome>` about the job's output location (resource `rayllm.<job>.<output>`,
    or `rayllm.<resource>.<output>`), for automations to chain on."""
    output = output.rstrip("/")
    emit_event(
        event=f"rayllm.{job}.{outcome}",
        resource={"prefect.resource.id": f"rayllm.{resource or job}.{output}", "prefect.resource.name": output},
        payload=payload,
    )
