"""Endpoint rollout as a Prefect flow: a new model version reaches users only after it proved itself.

deploy the candidate beside the current version -> health -> smoke -> evaluation gate -> canary
steps (each checked on error rate and latency) -> promote and delete the old version. Everything
up to the promotion runs in one Prefect transaction: any failure rolls it back through the
deploy task's `on_rollback` hook, which gives the previous version all traffic again and deletes
the candidate. Clients on the stable URL see no failed request on either path, because traffic
moves by reconfiguring the running router, never by restarting it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.transactions import transaction

from prefect_rayllm.flows.evaluation import evaluate
from prefect_rayllm.rayllm_stages.rollout.config import CANDIDATE_TARGET, RolloutConfig
from prefect_rayllm.tasks.endpoints import (
    GateRejected,
    RolloutReport,
    RolloutRolledBack,
    StepRecord,
    canary_failure,
    check_canary,
    deploy_candidate,
    plan_rollout,
    promote_version,
    publish_rollout,
    shift_traffic,
    smoke_test,
    wait_healthy,
)
from prefect_rayllm.tasks.locks import endpoint_lock
from prefect_rayllm.tasks.reporting import job_failed_hook
from prefect_rayllm.tasks.runtime import connect_ray


@flow(
    name="rollout-endpoint",
    validate_parameters=True,
    on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")],
)
def rollout_endpoint(config: RolloutConfig) -> RolloutReport:
    """Roll the candidate out to the endpoint, or leave the current version serving.

    Args:
        config: Endpoint, stable model name, candidate model, checks, canary steps, HTTP and Ray.

    Returns:
        The report: outcome `promoted` (or `unchanged` when the candidate already serves), the
        steps with their timings, and each canary step's counters.

    Raises:
        RolloutRolledBack: a check failed and the previous version serves all traffic again
            (the exception carries the report; the flow run ends Failed, and its failure hook
            emits `rayllm.rollout.rolled_back`; any other failure emits `rayllm.rollout.failed`).
    """
    # One rollout per endpoint at a time, whoever starts it (deployment, automation, Python):
    # another waits here for the global concurrency limit rollout-<endpoint>.
    with endpoint_lock(config.endpoint):
        return _roll_out(config)


def _roll_out(config: RolloutConfig) -> RolloutReport:
    logger = get_run_logger()
    connect_ray(config.ray_address)
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
    try:
        with transaction():
            with _step(report, "deploy") as note:
                candidate = deploy_candidate(config)
                note(f"{candidate.app} at {candidate.url}" + ("" if candidate.deployed_here else " (already deployed)"))
            with _step(report, "health") as note:
                note(f"RUNNING and listing {config.model_id} after {wait_healthy(config, candidate):.0f} s")
            with _step(report, "smoke") as note:
                results = smoke_test(config, candidate.url)
                note(", ".join(f"{r.reply!r} in {r.latency_s:.2f} s" for r in results))
            evaluation = config.evaluation_config(candidate.url, candidate.version)
            if evaluation is not None:
                with _step(report, "evaluation gate") as note:
                    verdict = evaluate(config=evaluation).verdicts[CANDIDATE_TARGET]
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
                        result = check_canary(config, step, candidate, time.time())
                        report.canary.append(result)
                        note(
                            f"candidate {result.candidate_requests} requests, {result.candidate_errors} errors, "
                            f"p99 {result.p99_s} s, probes {result.probes_ok}/{result.probes}"
                        )
                        if not result.passed:
                            raise canary_failure(result)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        report = report.model_copy(update={"outcome": "rolled_back", "serving": previous, "reason": reason})
        logger.error("rollout of %s to %s rolled back: %s", plan.version, config.endpoint, reason)
        publish_rollout(report)
        raise RolloutRolledBack(f"rollout of {plan.version} to {config.endpoint} rolled back: {reason}", report) from exc
    # Committed: the candidate proved itself. Deleting the old version cannot un-prove it, so it
    # runs outside the transaction (a failure here leaves the old app idle, not the endpoint broken).
    with _step(report, "promote") as note:
        deleted = promote_version(config, candidate)
        note(f"{candidate.version} serves 100%; deleted {', '.join(deleted) or 'nothing'}")
    report = report.model_copy(update={"outcome": "promoted", "serving": candidate.version})
    publish_rollout(report)
    return report


@contextmanager
def _step(report: RolloutReport, name: str) -> Iterator:
    """Record one step's timing and result in the report, failed or not."""
    record = StepRecord(step=name, passed=False, started=time.time(), finished=time.time())
    report.steps.append(record)
    details: list[str] = []
    try:
        yield details.append
        record.passed = True
    except Exception as exc:
        details.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record.finished = time.time()
        record.detail = "; ".join(details)[:500]
