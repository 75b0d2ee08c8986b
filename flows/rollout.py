"""Endpoint rollout as a Prefect flow: a new model version reaches users only after it proved itself.

deploy the candidate beside the current version -> health -> smoke -> evaluation gate -> canary
steps (each checked on error rate and latency) -> promote and delete the old version. Clients on
the stable URL see no failed request on any path, because traffic moves by reconfiguring the
running router, never by restarting it.

A check ends in a verdict or in nothing: a check that could not be measured (an infrastructure
error, a timeout, too little traffic) is tried again with backoff (`timeouts.check_attempts`),
and a verdict is final at once. When the rollout stops before the promotion, and only then,
after every check and retry has ended, the candidate is removed and the previous version gets
all traffic again: outcome `rolled_back` (the candidate failed a check) or `inconclusive` (a
check could not be measured), with the first real failure as the reason, in plain text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger

from prefect_rayllm.flows.evaluation import evaluate
from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.rollout.config import CANDIDATE_TARGET, RolloutConfig
from prefect_rayllm.rayllm_stages.rollout.endpoints import CandidateRejected, CheckUnmeasured, VersionInfo, version_info
from prefect_rayllm.tasks.endpoints import (
    GateRejected,
    RolloutInconclusive,
    RolloutReport,
    RolloutRolledBack,
    StepRecord,
    canary_failure,
    check_canary,
    check_retries,
    deploy_candidate,
    plain_reason,
    plan_rollout,
    promote_version,
    publish_rollout,
    remove_candidate,
    shift_traffic,
    smoke_test,
    wait_healthy,
)
from prefect_rayllm.tasks.jobs import FLOW_RESULT
from prefect_rayllm.tasks.locks import endpoint_lock
from prefect_rayllm.tasks.progress import report_step
from prefect_rayllm.tasks.reporting import job_failed_hook
from prefect_rayllm.tasks.runtime import connect_ray


@flow(
    name="rollout-endpoint",
    validate_parameters=True,
    on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")],
    **FLOW_RESULT,
)
def rollout_endpoint(config: RolloutConfig) -> RolloutReport:
    """Roll the candidate out to the endpoint, or leave the current version serving.

    Args:
        config: Endpoint, stable model name, candidate model, checks, canary steps, HTTP and Ray.

    Returns:
        The report: outcome `promoted` (or `unchanged` when the candidate already serves), the
        steps with their timings, and each canary step's counters; also the run's persisted result.

    Raises:
        RolloutRolledBack: the candidate failed a check; it is removed and the previous version
            serves all traffic again (the exception carries the report; the flow run ends Failed,
            and its failure hook emits `rayllm.rollout.rolled_back`).
        RolloutInconclusive: a check could not be measured, even after its retries; the same
            clean-up, `rayllm.rollout.inconclusive`. Any other failure emits `rayllm.rollout.failed`.
    """
    # One rollout per endpoint at a time, whoever starts it (deployment, automation, Python):
    # another waits here for the global concurrency limit rollout-<endpoint>.
    with endpoint_lock(config.endpoint):
        return _roll_out(config)


def _roll_out(config: RolloutConfig) -> RolloutReport:
    logger = get_run_logger()
    connect_ray(config.ray_address, config.ray_block)
    plan = plan_rollout(config)
    report = RolloutReport(
        endpoint=config.endpoint,
        url=config.stable_url,
        version=plan.version,
        previous=plan.primary,
        outcome="unchanged",
        serving=plan.primary,
    )
    if plan.primary == plan.version and plan.weights == {plan.version: 100}:
        logger.info("endpoint %s already serves %s: nothing to roll out", config.endpoint, plan.version)
        publish_rollout(report)
        return report
    previous = plan.primary if plan.primary != plan.version else None
    retried = check_retries(config)
    candidate: VersionInfo | None = None
    try:
        with _step(report, "deploy") as note:
            candidate = deploy_candidate(config)
            note(f"{candidate.app} at {candidate.url}" + ("" if candidate.deployed_here else " (already deployed)"))
        with _step(report, "health") as note:
            waited = wait_healthy.with_options(**retried)(config, candidate)
            note(f"RUNNING and listing {config.model_id} after {waited:.0f} s")
        with _step(report, "smoke") as note:
            results = smoke_test.with_options(**retried)(config, candidate.url)
            note(", ".join(f"{r.reply!r} in {r.latency_s:.2f} s" for r in results))
        evaluation = config.evaluation_config(candidate.url, candidate.version)
        if evaluation is not None:
            with _step(report, "evaluation gate") as note:
                verdict = _gate_verdict(config, evaluation)
                failed = [f"{c.name}: {c.detail}" for c in verdict.checks if not c.passed]
                note("; ".join(failed) if failed else f"{len(verdict.checks)} checks passed")
                if not verdict.passed:
                    raise GateRejected(f"evaluation gate rejected {candidate.version}: " + "; ".join(failed))
        if previous is None:
            with _step(report, "route 100% (first version)") as note:
                note(str(shift_traffic(config, {candidate.version: 100}, candidate, primary=candidate.version)))
        else:
            for step in config.canary:
                with _step(report, f"canary {step.percent}%") as note:
                    weights = {previous: 100 - step.percent, candidate.version: step.percent}
                    shift_traffic(config, weights, candidate)
                    result = check_canary.with_options(**retried)(config, step, candidate, time.time())
                    report.canary.append(result)
                    note(
                        f"candidate {result.candidate_requests} requests, {result.candidate_errors} errors, "
                        f"p99 {result.p99_s} s, probes {result.probes_ok}/{result.probes}"
                    )
                    if not result.passed:
                        raise canary_failure(result)
    except BaseException as exc:
        # Every check and retry has ended: only now is the candidate removed (a retry never runs
        # against a deleted version), and the reason is the failure that stopped the rollout.
        rejected = isinstance(exc, CandidateRejected)
        failed_step = next((s.step for s in reversed(report.steps) if not s.passed), "rollout")
        reason = f"{failed_step}: {plain_reason(exc)}"
        checked = failed_step in ("health", "smoke", "evaluation gate") or failed_step.startswith("canary")
        if checked and not rejected:
            reason = f"{failed_step} could not be measured: {plain_reason(exc)}"
        serving = _remove_candidate(config, candidate or version_info(config, plan.version), previous, logger)
        outcome = "rolled_back" if rejected else "inconclusive"
        report = report.model_copy(update={"outcome": outcome, "serving": serving, "reason": reason})
        if not isinstance(exc, Exception):  # interrupted (Ctrl-C, cancellation): clean up, then stop
            raise
        logger.error("rollout of %s to %s %s: %s", plan.version, config.endpoint, outcome.replace("_", " "), reason)
        publish_rollout(report)
        stopped = RolloutRolledBack if rejected else RolloutInconclusive
        raise stopped(f"rollout of {plan.version} to {config.endpoint} {outcome.replace('_', ' ')}: {reason}", report) from exc
    # The candidate proved itself. Deleting the old version cannot un-prove it (a failure here
    # leaves the old app idle, not the endpoint broken).
    with _step(report, "promote") as note:
        deleted = promote_version(config, candidate)
        note(f"{candidate.version} serves 100%; deleted {', '.join(deleted) or 'nothing'}")
    report = report.model_copy(update={"outcome": "promoted", "serving": candidate.version})
    publish_rollout(report)
    return report


def _gate_verdict(config: RolloutConfig, evaluation: EvaluationConfig):
    """The evaluation gate's verdict on the candidate, trying again with backoff when the
    evaluation could not run to the end (`CheckUnmeasured` after the last try)."""
    logger = get_run_logger()
    attempts = config.timeouts.check_attempts
    for attempt in range(1, attempts + 1):
        try:
            return evaluate(config=evaluation).verdicts[CANDIDATE_TARGET]
        except ConfigError as exc:  # another try cannot help
            raise CheckUnmeasured(f"the evaluation cannot run: {plain_reason(exc)}") from exc
        except Exception as exc:
            if attempt == attempts:
                raise CheckUnmeasured(f"the evaluation failed {attempts} times; last: {plain_reason(exc)}") from exc
            delay = config.timeouts.check_backoff_s * 2 ** (attempt - 1)
            logger.warning(
                "evaluation gate, try %d of %d, could not measure: %s; again in %.0f s",
                attempt,
                attempts,
                plain_reason(exc),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _remove_candidate(config: RolloutConfig, candidate: VersionInfo, previous: str | None, logger) -> str | None:
    """Remove the candidate and give the previous version all traffic; returns what serves."""
    try:
        return remove_candidate(config, candidate)
    except Exception as exc:  # the report still tells the first failure; this one is logged
        logger.error("removing candidate %s from %s failed: %s", candidate.version, config.endpoint, plain_reason(exc))
        return previous


@contextmanager
def _step(report: RolloutReport, name: str) -> Iterator:
    """Record one step's timing and result in the report, failed or not (and tell listeners)."""
    record = StepRecord(step=name, passed=False, started=time.time(), finished=time.time())
    report.steps.append(record)
    report_step(name, "started")
    details: list[str] = []
    try:
        yield details.append
        record.passed = True
    except BaseException as exc:
        details.append(plain_reason(exc))
        raise
    finally:
        record.finished = time.time()
        record.detail = "; ".join(details)[:500]
        report_step(name, "passed" if record.passed else "failed", record.finished - record.started, record.detail)
