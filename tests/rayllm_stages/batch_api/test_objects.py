"""The Batch API's objects against the `openai` SDK's own types, and the status mapping."""

from __future__ import annotations

import openai.types as sdk
import pytest
from openai.types.batch import Errors as SdkErrors

from prefect_rayllm.rayllm_stages.batch_api.objects import (
    Batch,
    BatchError,
    BatchErrors,
    BatchRecord,
    BatchRequestCounts,
    BatchUsage,
    FileDeleted,
    FileObject,
    FileRecord,
    Page,
    Progress,
    RunView,
    describe_batch,
    outcome_of,
    page,
    window_seconds,
)

T0 = 1_700_000_000


def _record(**changes) -> BatchRecord:
    fields = dict(
        id="batch_0001",
        input_file_id="file-0001",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
        created_at=T0,
        model="tiny",
        total_requests=10,
        output_url="/tmp/out/",
        flow_run_id="00000000-0000-0000-0000-000000000001",
    )
    return BatchRecord(**{**fields, **changes})


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Batch, sdk.Batch),
        (FileObject, sdk.FileObject),
        (FileDeleted, sdk.FileDeleted),
        (BatchError, sdk.BatchError),
        (BatchErrors, SdkErrors),
        (BatchRequestCounts, sdk.BatchRequestCounts),
        (BatchUsage, sdk.BatchUsage),
    ],
)
def test_objects_have_the_sdk_fields_exactly(ours, theirs):
    assert set(ours.model_fields) == set(theirs.model_fields)


def test_a_described_batch_is_read_by_the_sdk_unchanged():
    run = RunView(state="RUNNING", state_at=T0 + 5, started_at=T0 + 3)
    ours = describe_batch(_record(), run, Progress(10, 4, 1, tokens_in=40, tokens_out=20))
    wire = ours.model_dump(mode="json")
    assert set(wire) == set(sdk.Batch.model_fields)  # every field on the wire, nulls included
    theirs = sdk.Batch.model_validate(wire)
    assert theirs.status == "in_progress" and theirs.in_progress_at == T0 + 3
    assert theirs.request_counts.model_dump() == {"total": 10, "completed": 4, "failed": 1}
    assert theirs.usage.total_tokens == 60 and theirs.usage.input_tokens_details.cached_tokens == 0
    assert theirs.expires_at == T0 + 86400 and theirs.metadata == {"job": "nightly"}
    assert theirs.output_file_id is None and theirs.errors is None
    file = FileRecord(id="file-1", bytes=12, created_at=T0, filename="a.jsonl", purpose="batch", url="/x").to_object()
    assert sdk.FileObject.model_validate(file.model_dump(mode="json")).status == "processed"


@pytest.mark.parametrize(
    ("state", "started", "finalizing", "cancel_asked", "expired", "status"),
    [
        ("SCHEDULED", False, False, False, False, "validating"),
        ("PENDING", False, False, False, False, "validating"),
        ("SCHEDULED", True, False, False, False, "in_progress"),  # a retry, or resumed after a crash
        ("PENDING", True, False, False, False, "in_progress"),
        ("RUNNING", True, False, False, False, "in_progress"),
        ("PAUSED", True, False, False, False, "in_progress"),
        ("RUNNING", True, True, False, False, "finalizing"),
        ("RUNNING", True, False, True, False, "cancelling"),  # asked; Prefect not yet Cancelling
        ("SCHEDULED", False, False, True, False, "cancelling"),
        ("CANCELLING", True, False, False, False, "cancelling"),  # from the Prefect UI
        ("CANCELLED", True, False, True, False, "cancelled"),
        ("CANCELLED", False, False, False, False, "cancelled"),
        ("CANCELLED", True, False, False, True, "expired"),
        ("COMPLETED", True, True, False, False, "completed"),
        ("COMPLETED", True, True, True, False, "completed"),  # cancel came too late
        ("FAILED", True, False, False, False, "failed"),
        ("CRASHED", True, False, False, False, "failed"),
        ("CRASHED", True, False, True, False, "cancelled"),  # the stopped process said Crashed first
        ("CRASHED", True, False, False, True, "expired"),
    ],
)
def test_status_follows_the_run(state, started, finalizing, cancel_asked, expired, status):
    record = _record(cancelling_at=T0 + 7 if cancel_asked else None, expired_at=T0 + 9 if expired else None)
    run = RunView(
        state=state,
        state_at=T0 + 8,
        message="boom" if state in ("FAILED", "CRASHED") else None,
        started_at=T0 + 2 if started else None,
        ended_at=T0 + 8 if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None,
        finalizing_at=T0 + 6 if finalizing else None,
    )
    batch = describe_batch(record, run, Progress(10, 3, 1))
    assert batch.status == status
    stamps = {
        "completed": batch.completed_at,
        "cancelled": batch.cancelled_at,
        "expired": batch.expired_at,
        "failed": batch.failed_at,
    }
    for name, value in stamps.items():
        assert (value is not None) == (name == status), (name, stamps)
    if status == "cancelling":
        assert batch.cancelling_at == (T0 + 7 if cancel_asked else T0 + 8)
    if status == "failed":
        assert batch.errors.data[0].message == "boom" and batch.errors.data[0].code == "batch_failed"
    if finalizing:
        assert batch.finalizing_at == T0 + 6


def test_a_batch_that_failed_validation_lists_its_lines_and_has_no_run():
    errors = [BatchError(code="invalid_json", line=3, message="line 3: not valid JSON (Expecting value)")]
    batch = describe_batch(_record(flow_run_id=None, validation_errors=errors, failed_at=T0 + 1))
    assert batch.status == "failed" and batch.failed_at == T0 + 1
    assert batch.errors.object == "list" and batch.errors.data[0].line == 3
    assert batch.request_counts == BatchRequestCounts(total=0, completed=0, failed=0)


def test_a_batch_whose_run_is_not_created_yet_is_validating():
    assert describe_batch(_record(flow_run_id=None)).status == "validating"


def test_the_outcome_is_the_batch_once_its_run_is_over():
    record = _record()
    run = RunView(state="COMPLETED", state_at=T0 + 30, started_at=T0 + 2, ended_at=T0 + 30, finalizing_at=T0 + 28)
    record.outcome = outcome_of(record, run, Progress(10, 8, 2, 100, 50), "file-o", "file-e")
    later = describe_batch(record)  # no run needed any more
    assert later == describe_batch(_record(), run, Progress(10, 8, 2, 100, 50), "file-o", "file-e")
    assert (later.status, later.completed_at, later.output_file_id, later.error_file_id) == (
        "completed",
        T0 + 30,
        "file-o",
        "file-e",
    )
    assert later.request_counts.completed == 8 and later.usage.output_tokens == 50


def test_pages_follow_the_cursor():
    items = [FileObject(id=f"file-{i}", bytes=1, created_at=T0, filename="f", purpose="batch") for i in range(5)]
    first = page(items, 2, None)
    assert [f.id for f in first.data] == ["file-0", "file-1"] and first.has_more
    assert (first.first_id, first.last_id) == ("file-0", "file-1")
    last = page(items, 2, "file-3")
    assert [f.id for f in last.data] == ["file-4"] and not last.has_more
    assert page(items, 2, "file-unknown") == Page(data=[], has_more=False)


def test_completion_window_is_a_number_of_hours():
    assert window_seconds("24h") == 86400 and window_seconds("1h") == 3600
    for bad in ("24", "0h", "1d", "h", "-1h"):
        with pytest.raises(ValueError, match="completion_window"):
            window_seconds(bad)
