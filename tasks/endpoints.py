"""Endpoint lifecycle as Prefect tasks: deploy, health, smoke, traffic, canary checks, promote,
roll back, status and teardown, with the rollout's status artifact and events.

Every task is safe to retry (the functions under it read Serve's state first). A check's retries
(`check_retries`) retry only what could not be measured: a verdict on the candidate
(`CandidateRejected`) is final at once. API keys are resolved inside the tasks that need them,
never passed as parameters, so they reach neither the API's task inputs nor a log line.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from prefect_rayllm.rayllm_stages.config.base import ConfigError, StrictModel
from prefect_rayllm.rayllm_stages.llm.engines import cluster_has_gpu
from prefect_rayllm.rayllm_stages.rollout import endpoints
from prefect_rayllm.rayllm_stages.rollout.config import CanaryStep, RolloutConfig
from prefect_rayllm.rayllm_stages.rollout.endpoints import (
    CanaryCheckFailed,
    CanaryResult,
    CandidateRejected,
    EndpointStatus,
    SmokeResult,
    VersionInfo,
)
from prefect_rayllm.tasks.reporting import JobFailed, artifact_key, emit_job_event
from prefect_rayllm.tasks.secrets import resolve_api_key

SERVE_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10]}


class RolloutPlan(StrictModel):
    endpoint: str
    version: str
    primary: str | None = Field(description="the version serving now (None: first deployment)")
    weights: dict[str, int] = Field(default_factory=dict)


class StepRecord(StrictModel):
    """One step of a rollout, as the status artifact shows it."""

    step: str
    passed: bool
    started: float
    finished: float
    detail: str = ""


class RolloutReport(StrictModel):
    """The outcome of one rollout (the flow's return value, and carried by `RolloutRolledBack`)."""

    endpoint: str
    url: str
    version: str
    previous: str | None
    outcome: Literal["promoted", "rolled_back", "inconclusive", "unchanged"] = Field(
        description="rolled_back: the candidate failed a check; inconclusive: a check could not be measured "
        "(either way the candidate is removed and the previous version serves all traffic, as before)"
    )
    serving: str | None = Field(description="the version serving all traffic afterwards")
    steps: list[StepRecord] = Field(default_factory=list)
    canary: list[CanaryResult] = Field(default_factory=list)
    reason: str | None = None


ROLLOUT_EVENT_FIELDS = {"version", "previous", "serving", "outcome", "reason", "url"}


def rollout_event_payload(report: RolloutReport) -> dict[str, Any]:
    """What `rayllm.rollout.promoted`, `.rolled_back` and `.inconclusive` carry."""
    return report.model_dump(mode="json", include=ROLLOUT_EVENT_FIELDS)


class RolloutStopped(JobFailed):
    """The rollout stopped before the promotion: the candidate is removed and the previous version
    serves all traffic again. Carries the report; the flow's failure hook turns it into
    `rayllm.rollout.<outcome>` with it."""

    outcome = "stopped"

    def __init__(self, message: str, report: RolloutReport):
        super().__init__(message, rollout_event_payload(report))
        self.report = report

    def __reduce__(self):  # keep the report when Prefect pickles the exception
        return type(self), (self.message, self.report)


class RolloutRolledBack(RolloutStopped):
    """The candidate failed a check (a verdict): `rayllm.rollout.rolled_back`."""

    outcome = "rolled_back"


class RolloutInconclusive(RolloutStopped):
    """A check could not be measured, even after its retries (infrastructure error, timeout):
    nothing was learnt about the candidate. `rayllm.rollout.inconclusive`."""

    outcome = "inconclusive"


class GateRejected(CandidateRejected):
    """The evaluation gate rejected the candidate."""


def check_retries(config: RolloutConfig) -> dict[str, Any]:
    """`Task.with_options` for a check: `timeouts.check_attempts` tries with doubling backoff,
    retrying only what was not measured (never a verdict, never a config error)."""
    attempts, backoff = config.timeouts.check_attempts, config.timeouts.check_backoff_s
    return {
        "retries": attempts - 1,
        "retry_delay_seconds": [backoff * 2**i for i in range(attempts - 1)] or 0,
        "retry_condition_fn": _retry_unless_verdict,
    }


def _retry_unless_verdict(task, task_run, state) -> bool:
    try:
        state.result()
    except (CandidateRejected, ConfigError):
        return False
    except Exception:
        return True
    return True


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_reason(exc: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line of plain text: no colour codes, no traceback (its last line
    stands for it), whitespace collapsed, at most `limit` characters."""
    text = _ANSI.sub("", str(exc)).strip()
    if "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = " ".join(text.split())
    name = type(exc).__name__
    reason = text if text.startswith(f"{name}:") else (f"{name}: {text}" if text else name)
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def endpoint_key(config: RolloutConfig) -> str | None:
    """The endpoint's API key (env var or Prefect Secret), or None when it has none."""
    return resolve_api_key(config.endpoint_spec(config.stable_url))


@task(name="plan-rollout", cache_policy=NO_CACHE, **SERVE_RETRIES)
def plan_rollout(config: RolloutConfig) -> RolloutPlan:
    """Which version the candidate is, and which one serves now."""
    endpoints.ensure_serve_http(config.http)
    table = endpoints.read_table(config.endpoint)
    plan = RolloutPlan(
        endpoint=config.endpoint,
        version=config.version_id(),
        primary=table.primary if table else None,
        weights=table.weights if table else {},
    )
    get_run_logger().info(
        "endpoint %s: candidate %s, serving now %s %s", config.endpoint, plan.version, plan.primary or "nothing", plan.weights
    )
    return plan


@task(name="deploy-candidate", cache_policy=NO_CACHE, **SERVE_RETRIES)
def deploy_candidate(config: RolloutConfig) -> VersionInfo:
    """Deploy the candidate beside the current version (reused when it already runs).

    `remove_candidate` undoes it.
    """
    info = endpoints.deploy_version(config, cluster_has_gpu())
    get_run_logger().info("candidate %s at %s", info.version, info.url)
    return info


@task(name="remove-candidate", cache_policy=NO_CACHE, **SERVE_RETRIES)
def remove_candidate(config: RolloutConfig, candidate: VersionInfo) -> str | None:
    """Give the primary version all traffic again and delete the candidate; returns the primary.

    Safe at any point of a rollout (before the router exists, after a partial shift) and twice.
    The rollout flow runs it once, after the last check and all of its retries have ended.
    """
    primary = endpoints.rollback(config, candidate, cluster_has_gpu(), api_key=endpoint_key(config))
    get_run_logger().warning(
        "endpoint %s: %s serves all traffic, candidate %s deleted", config.endpoint, primary or "nothing", candidate.version
    )
    return primary


@task(name="wait-healthy", cache_policy=NO_CACHE)
def wait_healthy(config: RolloutConfig, info: VersionInfo) -> float:
    """Serve reports the version RUNNING and its `/v1/models` lists the model; returns seconds waited."""
    seconds = endpoints.wait_healthy(info, config.model_id, config.timeouts.deploy_s, endpoint_key(config))
    get_run_logger().info("version %s healthy after %.1f s", info.version, seconds)
    return seconds


@task(name="smoke-test", cache_policy=NO_CACHE)
def smoke_test(config: RolloutConfig, base_url: str) -> list[SmokeResult]:
    """Every golden prompt against `base_url`: non-empty, in time, matching `expect` / `json_schema`.

    Raises `SmokeTestFailed` (a verdict) or `CheckUnmeasured` (no answer); run it with
    `smoke_test.with_options(**check_retries(config))` to retry only the latter."""
    results = endpoints.smoke_test(base_url, config.model_id, config.smoke, endpoint_key(config), config.timeouts.request_s)
    get_run_logger().info("smoke test on %s: %d of %d prompts passed", base_url, len(results), len(results))
    return results


@task(name="shift-traffic", cache_policy=NO_CACHE, **SERVE_RETRIES)
def shift_traffic(
    config: RolloutConfig, weights: dict[str, int], candidate: VersionInfo | None = None, primary: str | None = None
) -> dict[str, int]:
    """Apply `weights` (version -> percent) at the router, in place; creates the router the first time."""
    table = endpoints.set_traffic(
        config, weights, cluster_has_gpu(), candidate=candidate, primary=primary, api_key=endpoint_key(config)
    )
    get_run_logger().info("endpoint %s traffic: %s (primary %s)", config.endpoint, table.weights, table.primary)
    return table.weights


@task(name="check-canary", cache_policy=NO_CACHE)
def check_canary(config: RolloutConfig, step: CanaryStep, candidate: VersionInfo, since: float) -> CanaryResult:
    """Hold the step, probe the stable URL, then check the candidate's error rate and latency.

    Returns the step's counters (`result.problems`: the verdict); raises `CheckUnmeasured` when
    the step could not be judged. Run it with `check_retries(config)`."""
    result = endpoints.hold_and_check(config, step, candidate, since, endpoint_key(config))
    get_run_logger().info(
        "canary %d%%: candidate served %d requests, %d errors, p99 %s s; probes %d/%d",
        step.percent,
        result.candidate_requests,
        result.candidate_errors,
        result.p99_s,
        result.probes_ok,
        result.probes,
    )
    return result


@task(name="promote-version", cache_policy=NO_CACHE, **SERVE_RETRIES)
def promote_version(config: RolloutConfig, candidate: VersionInfo) -> list[str]:
    """The candidate becomes the primary with all traffic; every other version is deleted."""
    deleted = endpoints.promote(config, candidate, cluster_has_gpu(), endpoint_key(config))
    get_run_logger().info("endpoint %s promoted %s; deleted %s", config.endpoint, candidate.version, deleted or "nothing")
    return deleted


@task(name="scale-version", cache_policy=NO_CACHE, **SERVE_RETRIES)
def scale_version(config: RolloutConfig, min_replicas: int, max_replicas: int) -> VersionInfo:
    """Set the autoscaling bounds of the running version `config` deployed, in place (no restart)."""
    info = endpoints.scale_version(config, min_replicas, max_replicas, cluster_has_gpu())
    get_run_logger().info("%s autoscales between %d and %d replicas", info.app, min_replicas, max_replicas)
    return info


@task(name="endpoint-status", cache_policy=NO_CACHE)
def endpoint_status(endpoint: str) -> EndpointStatus:
    return endpoints.endpoint_status(endpoint)


@task(name="teardown-endpoint", cache_policy=NO_CACHE, **SERVE_RETRIES)
def teardown_endpoint(endpoint: str) -> list[str]:
    deleted = endpoints.teardown(endpoint)
    get_run_logger().info("endpoint %s: deleted %s", endpoint, deleted or "nothing")
    return deleted


def canary_failure(result: CanaryResult) -> CanaryCheckFailed:
    return CanaryCheckFailed(f"canary {result.percent}%: " + "; ".join(result.problems))


@task(name="publish-rollout", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_rollout(report: RolloutReport) -> None:
    """Status table (one row per step), a markdown summary, and the event `rayllm.rollout.promoted`
    (the flow's failure hook tells `rolled_back` and `inconclusive`)."""
    rows = [
        {
            "step": s.step,
            "result": "passed" if s.passed else "FAILED",
            "seconds": round(s.finished - s.started, 1),
            "detail": s.detail,
        }
        for s in report.steps
    ]
    create_table_artifact(
        rows, key=artifact_key("rollout", report.endpoint), description=f"Rollout of {report.endpoint}: {report.outcome}"
    )
    lines = [
        f"# Rollout of `{report.endpoint}`: {report.outcome.replace('_', ' ')}",
        "",
        f"Candidate `{report.version}`, previous `{report.previous or '-'}`, now serving `{report.serving or '-'}` at `{report.url}`.",
    ]
    if report.reason:
        lines += ["", f"Reason: {report.reason}"]
    if report.canary:
        lines += [
            "",
            "| canary | candidate requests | errors | p50 (s) | p99 (s) | probes |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c.percent}% | {c.candidate_requests} | {c.candidate_errors} | {c.p50_s} | {c.p99_s} | {c.probes_ok}/{c.probes} |"
            for c in report.canary
        ]
    create_markdown_artifact("\n".join(lines), key=artifact_key("rollout-report", report.endpoint), description="Rollout report")
    if report.outcome == "promoted":  # a stopped rollout is told by the flow's failure hook (RolloutStopped)
        emit_job_event("rollout", "promoted", report.endpoint, rollout_event_payload(report), resource="endpoint")
