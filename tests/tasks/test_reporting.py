"""What a run tells the Prefect UI and automations: artifact keys, event payloads, and the one way a
failure becomes an event (`job_failed_hook`), checked against a real Prefect server."""

from __future__ import annotations

import pickle
import uuid

import pytest
from prefect import flow

from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest, percentiles
from prefect_rayllm.tasks.reporting import (
    ErrorRateExceeded,
    JobFailed,
    artifact_key,
    batch_report_markdown,
    batch_summary_rows,
    conclude_job,
    job_event_payload,
    job_failed_hook,
)


def manifest(job: str = "batch", failed: int = 1, total: int = 4, **fields) -> Manifest:
    return Manifest.model_validate(
        {
            "status": "completed",
            "job": job,
            "input": {"url": "in.jsonl", "format": "openai_batch"},
            "outputs": {"results": "out/results.jsonl", "errors": "out/errors.jsonl", "manifest": "out/manifest.json"},
            "model": {"name": "tiny", "engine": "vllm"},
            "counts": {"total": total, "completed": total - failed, "failed": failed, "error_rate": failed / total},
            "timings": {"started_at": 1.0, "finished_at": 2.0, "wall_s": 1.0},
            "throughput": {
                "rows_per_s": 4.0,
                "output_tokens_per_s": 8.0,
                "tokens_in": 4,
                "tokens_out": 8,
                "latency_s": percentiles([]),
            },
            "attempts": [{"attempt": 1, "rows": total, "seconds": 1.0}],
            **fields,
        }
    )


def test_artifact_keys_are_stable_short_and_distinct_per_output():
    key = artifact_key("batch-summary", "s3://Bucket/runs/2024-01-01/run_1/")
    assert key == artifact_key("batch-summary", "s3://Bucket/runs/2024-01-01/run_1")  # trailing slash
    assert key.startswith("batch-summary-") and key == key.lower() and len(key) <= len("batch-summary") + 50
    assert artifact_key("batch-summary", "s3://other/run_1") != key


def test_event_payloads_per_job():
    batch = manifest(max_error_rate=0.5, steps=None)
    assert job_event_payload(batch) == {
        "counts": batch.counts.model_dump(),
        "outputs": batch.outputs,
        "model": batch.model,
        "steps": None,
    }
    curation = manifest(
        "curation",
        curation={"rejected_by_stage": {"decode": 1}, "rejected_by_reason": {}, "funnel": [], "fetch": {}},
    )
    assert job_event_payload(curation) == {
        "input": 4,
        "curated": 3,
        "rejected": 1,
        "rejected_by_stage": {"decode": 1},
        "outputs": curation.outputs,
    }


def test_error_rate_above_the_limit_raises_with_the_failed_event_payload():
    with pytest.raises(ErrorRateExceeded, match=r"3 of 4 rows failed \(75.00%\), above max_error_rate 50.00%") as raised:
        conclude_job("batch", "out", manifest(failed=3), max_error_rate=0.5)
    error = raised.value
    assert error.outcome == "failed" and error.payload["reason"] == "error rate above max_error_rate"
    assert error.payload["counts"]["failed"] == 3
    # Prefect pickles a flow's exception: the payload survives.
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, JobFailed) and copy.payload == error.payload and str(copy) == str(error)


def test_batch_report_says_the_limit_and_the_counts():
    text = batch_report_markdown(manifest(failed=1, max_error_rate=0.5))
    assert "3 of 4 rows completed, 1 failed (25.00%, within the 50.00% limit)" in text
    rows = {r["metric"]: r["value"] for r in batch_summary_rows(manifest(failed=3, max_error_rate=0.5))}
    assert rows["error rate"] == "75.00% (max 50.00%)" and rows["attempts (rows each)"] == "4"


def test_completed_event_when_within_the_limit(prefect_server):
    from prefect_api import wait_for_event

    output = f"s3://bucket/ok-{uuid.uuid4().hex[:8]}/"

    @flow
    def concludes() -> None:
        conclude_job("chain", output, manifest("chain", failed=0, steps=[{"name": "a"}]), max_error_rate=0.1)
        conclude_job("curation", output, manifest("curation", curation={"rejected_by_stage": {}, **_empty_section()}), None)

    concludes()
    chain = wait_for_event("rayllm.chain.completed", f"rayllm.chain.{output.rstrip('/')}")
    assert chain.payload["steps"] == [{"name": "a"}] and chain.resource["prefect.resource.name"] == output.rstrip("/")
    curation = wait_for_event("rayllm.curation.completed", f"rayllm.curation.{output.rstrip('/')}")
    assert (curation.payload["curated"], curation.payload["rejected"]) == (3, 1)


def _empty_section() -> dict:
    return {"rejected_by_reason": {}, "funnel": [], "fetch": {}}


def test_one_failure_hook_for_every_job(prefect_server):
    """Any exception fails the run with `rayllm.<job>.failed` and its reason; a `JobFailed` names
    its own outcome and payload; `key` and `resource` pick what the event is about."""
    from prefect_api import wait_for_event

    run = uuid.uuid4().hex[:8]

    @flow(on_failure=[job_failed_hook("batch")])
    def batch_job(config: dict) -> None:
        raise ValueError(f"input {config['output']}in.jsonl is missing")

    @flow(on_failure=[job_failed_hook("batch")])
    def too_many_errors(config: dict) -> None:
        raise ErrorRateExceeded("3 of 4 rows failed", {"counts": {"failed": 3}, "reason": "error rate above max_error_rate"})

    @flow(on_failure=[job_failed_hook("evaluation", key="name", unknown="unnamed")])
    def evaluation(config: dict) -> None:
        raise RuntimeError("gate failed")

    class RolledBack(JobFailed):
        outcome = "rolled_back"

    @flow(on_failure=[job_failed_hook("rollout", key="endpoint", resource="endpoint")])
    def rollout(config: dict) -> None:
        raise RolledBack("rolled back", {"version": "v2", "outcome": "rolled_back"})

    for failing, config in (
        (batch_job, {"output": f"s3://b/{run}/"}),
        (too_many_errors, {"output": f"s3://b/{run}-rate"}),
        (evaluation, {"name": f"colours-{run}"}),
        (evaluation, {}),
        (rollout, {"endpoint": f"colours-{run}"}),
    ):
        assert failing(config=config, return_state=True).is_failed()

    event = wait_for_event("rayllm.batch.failed", f"rayllm.batch.s3://b/{run}")
    assert event.payload == {"reason": f"ValueError: input s3://b/{run}/in.jsonl is missing"}
    event = wait_for_event("rayllm.batch.failed", f"rayllm.batch.s3://b/{run}-rate")
    assert event.payload == {"counts": {"failed": 3}, "reason": "error rate above max_error_rate"}
    event = wait_for_event("rayllm.evaluation.failed", f"rayllm.evaluation.colours-{run}")
    assert event.payload == {"reason": "RuntimeError: gate failed"}
    assert wait_for_event("rayllm.evaluation.failed", "rayllm.evaluation.unnamed").payload["reason"]
    event = wait_for_event("rayllm.rollout.rolled_back", f"rayllm.endpoint.colours-{run}")
    assert event.payload == {"version": "v2", "outcome": "rolled_back"}


def test_a_run_failing_on_its_parameters_still_emits(prefect_server):
    from prefect_api import wait_for_event

    output = f"/tmp/rayllm-{uuid.uuid4().hex[:8]}"

    @flow(validate_parameters=True, on_failure=[job_failed_hook("batch")])
    def typed(config: BatchJobConfig) -> None:
        pass

    state = typed(
        config={"input": "in.jsonl", "output": output, "model": {"source": "m"}, "sampling": {"max_tokens": 0}}, return_state=True
    )
    assert state.is_failed()
    event = wait_for_event("rayllm.batch.failed", f"rayllm.batch.{output}")
    assert "max_tokens" in event.payload["reason"]


def test_report_separates_start_up_from_steady_throughput_and_charts_the_engine():
    import base64
    import re

    engine = {
        "answer": {
            "first_request_at": 31.0,
            "decode_tokens_per_s": 900.0,
            "running": {"mean": 10, "max": 12, "max_num_seqs": 16},
            "series": {"t_s": [0, 1, 2], "decode_tokens_per_s": [0, 900, 450], "running": [12, 12, 3]},
        }
    }
    run = manifest(
        failed=0,
        total=101,
        timings={"started_at": 1.0, "finished_at": 80.0, "wall_s": 75.0, "first_result_s": 50.0},
        throughput={
            "rows_per_s": 1.3,
            "output_tokens_per_s": 13.0,
            "tokens_in": 100,
            "tokens_out": 1010,
            "latency_s": percentiles([]),
        },
        engine=engine,
    )
    summary = {row["metric"]: row["value"] for row in batch_summary_rows(run)}
    assert summary["steady rows/s (first result -> last)"] == "4.0"  # 100 rows after the first, over 25 s
    assert summary["steady output tokens/s"] == "40.0"
    assert summary["engine: answer first request after (s)"] == "30.0"
    report = batch_report_markdown(run)
    assert "first request 30.0 s after the job started" in report and "first result: 50.0 s" in report
    svg = base64.b64decode(re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", report).group(1)).decode()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "decode tok/s (max 900)" in svg


def test_report_of_a_run_without_engine_timings_has_no_chart():
    report = batch_report_markdown(manifest())
    assert "## Timeline" in report and "data:image" not in report
