"""Rollout reporting: the status artifacts and the rollout events (`promoted` from the report task,
`rolled_back` and `failed` from the flow's failure hook), against a real Prefect server."""

from __future__ import annotations

import json
import pickle
import time
import uuid

from prefect import flow

from prefect_rayllm.tasks.endpoints import RolloutReport, RolloutRolledBack, StepRecord, publish_rollout, rollout_event_payload
from prefect_rayllm.tasks.reporting import artifact_key, job_failed_hook


def report(endpoint: str, outcome: str, **fields) -> RolloutReport:
    now = time.time()
    return RolloutReport(
        endpoint=endpoint,
        url=f"http://127.0.0.1:8000/{endpoint}",
        version="v2",
        previous="v1",
        outcome=outcome,
        serving="v2" if outcome == "promoted" else "v1",
        steps=[StepRecord(step="deploy", passed=True, started=now, finished=now + 1.5, detail="app v2")],
        **fields,
    )


def test_rolled_back_carries_the_report_and_its_event_payload():
    rolled_back = report("colours", "rolled_back", reason="GateRejected: exact_match 0.2 < 0.8")
    error = RolloutRolledBack("rollout of v2 to colours rolled back", rolled_back)
    assert error.outcome == "rolled_back" and error.report == rolled_back
    assert error.payload == rollout_event_payload(rolled_back)
    assert error.payload == {
        "version": "v2",
        "previous": "v1",
        "serving": "v1",
        "outcome": "rolled_back",
        "reason": "GateRejected: exact_match 0.2 < 0.8",
        "url": "http://127.0.0.1:8000/colours",
    }
    copy = pickle.loads(pickle.dumps(error))  # as Prefect stores a failed run's exception
    assert copy.report == rolled_back and copy.payload == error.payload


def test_promoted_from_the_report_task_rolled_back_from_the_failure_hook(prefect_server):
    from prefect_api import artifacts_with_key, wait_for_event

    endpoint = f"colours-{uuid.uuid4().hex[:8]}"

    @flow
    def promoted() -> None:
        publish_rollout(report(endpoint, "promoted"))

    @flow(on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")])
    def rolled_back(config: dict) -> None:
        failed = report(endpoint, "rolled_back", reason="canary 10%: 3 errors")
        publish_rollout(failed)  # the artifacts; the event comes from the hook
        raise RolloutRolledBack(f"rollout of v2 to {endpoint} rolled back", failed)

    @flow(on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")])
    def broken(config: dict) -> None:
        raise TimeoutError("rollout-lock busy for 600 s")

    promoted()
    event = wait_for_event("rayllm.rollout.promoted", f"rayllm.endpoint.{endpoint}")
    assert event.payload["outcome"] == "promoted" and event.payload["serving"] == "v2"
    rows = json.loads(artifacts_with_key(artifact_key("rollout", endpoint))[0].data)
    assert rows == [{"step": "deploy", "result": "passed", "seconds": 1.5, "detail": "app v2"}]

    assert rolled_back(config={"endpoint": endpoint}, return_state=True).is_failed()
    event = wait_for_event("rayllm.rollout.rolled_back", f"rayllm.endpoint.{endpoint}")
    assert event.payload["reason"] == "canary 10%: 3 errors" and event.payload["serving"] == "v1"
    reports = [a.data for a in artifacts_with_key(artifact_key("rollout-report", endpoint))]
    assert any("rolled back" in text and "canary 10%: 3 errors" in text for text in reports), reports

    assert broken(config={"endpoint": endpoint}, return_state=True).is_failed()
    event = wait_for_event("rayllm.rollout.failed", f"rayllm.endpoint.{endpoint}")
    assert event.payload == {"reason": "TimeoutError: rollout-lock busy for 600 s"}


def test_inconclusive_is_its_own_outcome_and_event(prefect_server):
    """A check that could not be measured stops the rollout as `inconclusive`: its own exception,
    outcome and event, never `rolled_back` (the candidate was not found failing the bar)."""
    from prefect_api import wait_for_event

    from prefect_rayllm.tasks.endpoints import RolloutInconclusive

    endpoint = f"colours-{uuid.uuid4().hex[:8]}"
    reason = "evaluation gate could not be measured: CheckUnmeasured: the evaluation failed 3 times"

    @flow(on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")])
    def inconclusive(config: dict) -> None:
        stopped = report(endpoint, "inconclusive", reason=reason)
        publish_rollout(stopped)
        raise RolloutInconclusive(f"rollout of v2 to {endpoint} inconclusive: {reason}", stopped)

    error = RolloutInconclusive("x", report(endpoint, "inconclusive", reason=reason))
    assert error.outcome == "inconclusive" and not isinstance(error, RolloutRolledBack)
    assert pickle.loads(pickle.dumps(error)).report == error.report

    assert inconclusive(config={"endpoint": endpoint}, return_state=True).is_failed()
    event = wait_for_event("rayllm.rollout.inconclusive", f"rayllm.endpoint.{endpoint}")
    assert event.payload["outcome"] == "inconclusive" and event.payload["reason"] == reason
    assert event.payload["serving"] == "v1"
