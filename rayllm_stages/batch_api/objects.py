"""The objects of OpenAI's Files and Batches API, field for field as the `openai` SDK reads them
(`openai.types.FileObject`, `Batch`, `FileDeleted`, the cursor pages), and how a batch's status
follows from what is stored and what its run is doing.

A batch is described from three things, none of them held in memory:
    BatchRecord  what the API stored when the batch was created (and when it was cancelled or expired)
    RunView      the state of the Prefect flow run that executes it (None: no run, e.g. validation failed)
    Progress     the counts: from the job's manifest when it finished, else from its committed parts

Status, from the run's state (Prefect state types):
    SCHEDULED, PENDING (never started)      validating   (the run's first task checks the input again)
    SCHEDULED, PENDING (started before)     in_progress  (a retry, or a resume after a crash)
    RUNNING, PAUSED                         in_progress, or finalizing once its finalize task started
    CANCELLING, or cancel requested         cancelling
    CANCELLED (or CRASHED once cancelled)   cancelled, or expired when the completion window ran out
    COMPLETED                               completed
    FAILED, CRASHED                         failed (the state's message in `errors`)
and `failed` without a run when the input file did not pass the checks (each bad line in `errors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
FINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOW = re.compile(r"^([1-9][0-9]*)h$")


class OpenAIObject(BaseModel):
    """An object as the API returns it: every field, nulls included (the SDK reads them all)."""

    model_config = ConfigDict(extra="forbid")


class FileObject(OpenAIObject):
    """`openai.types.FileObject`."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(OpenAIObject):
    """`openai.types.FileDeleted`."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchError(OpenAIObject):
    """`openai.types.BatchError`: one problem, with the input line when there is one."""

    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(OpenAIObject):
    """`openai.types.batch.Errors`."""

    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchRequestCounts(OpenAIObject):
    """`openai.types.BatchRequestCounts`."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(OpenAIObject):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIObject):
    reasoning_tokens: int = 0


class BatchUsage(OpenAIObject):
    """`openai.types.BatchUsage`: tokens of the requests finished so far."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class Batch(OpenAIObject):
    """`openai.types.Batch`."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class Page(OpenAIObject):
    """A cursor page (`SyncCursorPage`): the SDK asks for the next one `after` the last id while `has_more`."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def page(items: list[Any], limit: int, after: str | None) -> Page:
    """The page of `items` (already in list order, each with an `id`) that follows `after`."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return Page(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(items) > limit,
    )


# -- what is stored ---------------------------------------------------------------------------
class FileRecord(BaseModel):
    """A file as stored: its object's fields and where its bytes are."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    url: str = Field(description="fsspec URL of the content")
    batch_id: str | None = Field(None, description="batch_output: the batch that wrote it")
    deleted: bool = False

    def to_object(self) -> FileObject:
        return FileObject(id=self.id, bytes=self.bytes, created_at=self.created_at, filename=self.filename, purpose=self.purpose)


class Outcome(BaseModel):
    """What a batch came to, written once its run is over (later reads need neither Prefect nor the run log)."""

    status: BatchStatus
    counts: BatchRequestCounts
    usage: BatchUsage | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    ended_at: int
    message: str | None = None


class BatchRecord(BaseModel):
    """A batch as stored when it was created, and what the API itself did to it later."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    created_at: int
    model: str | None = None
    total_requests: int = 0
    output_url: str = Field(description="the batch job's output folder")
    flow_run_id: str | None = None
    validation_errors: list[BatchError] | None = Field(None, description="the input did not pass the checks: no run")
    failed_at: int | None = None
    cancelling_at: int | None = None
    expired_at: int | None = None
    resumes: int = Field(0, description="times the API put a run whose process was gone back in the queue")
    outcome: Outcome | None = None

    @property
    def expires_at(self) -> int:
        return self.created_at + window_seconds(self.completion_window)


def window_seconds(window: str) -> int:
    """`24h` -> 86400.

    Raises:
        ValueError: not a number of hours.
    """
    match = COMPLETION_WINDOW.match(window)
    if not match:
        raise ValueError(f"completion_window {window!r} is not supported (a number of hours, e.g. '24h')")
    return int(match.group(1)) * 3600


# -- what the run is doing -----------------------------------------------------------------------
@dataclass
class RunView:
    """The flow run of a batch, as the status needs it (Unix seconds)."""

    state: str  # Prefect's state type: SCHEDULED, PENDING, RUNNING, PAUSED, CANCELLING, CANCELLED, COMPLETED, FAILED, CRASHED
    state_at: float
    message: str | None = None
    started_at: float | None = None  # the first time it ran
    ended_at: float | None = None
    finalizing_at: float | None = None  # its finalize task started


@dataclass
class Progress:
    """Requests finished so far (or in all), and their tokens."""

    total: int
    completed: int
    failed: int
    tokens_in: int = 0
    tokens_out: int = 0

    def counts(self) -> BatchRequestCounts:
        return BatchRequestCounts(total=self.total, completed=self.completed, failed=self.failed)

    def usage(self) -> BatchUsage:
        return BatchUsage(
            input_tokens=self.tokens_in, output_tokens=self.tokens_out, total_tokens=self.tokens_in + self.tokens_out
        )


RUN_STATUS = {
    "RUNNING": "in_progress",
    "PAUSED": "in_progress",
    "CANCELLING": "cancelling",
    "CANCELLED": "cancelled",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CRASHED": "failed",
}


def run_status(record: BatchRecord, run: RunView) -> BatchStatus:
    """The batch's status while (or once) its run is the one seen."""
    if run.state in ("SCHEDULED", "PENDING"):
        status = "in_progress" if run.started_at is not None else "validating"
    else:
        status = RUN_STATUS.get(run.state, "in_progress")
    if status == "in_progress" and run.finalizing_at is not None:
        status = "finalizing"
    if status in ("validating", "in_progress", "finalizing") and record.cancelling_at is not None:
        status = "cancelling"  # asked for; the run has not reached Cancelling yet
    if run.state == "CRASHED" and (record.cancelling_at is not None or record.expired_at is not None):
        status = "cancelled"  # the stopped process reported the crash before its runner reported the cancel
    if status == "cancelled" and record.expired_at is not None:
        status = "expired"
    return status  # type: ignore[return-value]


def describe_batch(
    record: BatchRecord,
    run: RunView | None = None,
    progress: Progress | None = None,
    output_file_id: str | None = None,
    error_file_id: str | None = None,
) -> Batch:
    """The `Batch` object of a stored batch: its outcome when it has one, else its run and progress.

    Example:
        >>> describe_batch(record, RunView(state="RUNNING", state_at=t, started_at=t), Progress(10, 4, 1)).status
        'in_progress'
    """
    fields: dict[str, Any] = dict(
        id=record.id,
        endpoint=record.endpoint,
        model=record.model,
        input_file_id=record.input_file_id,
        completion_window=record.completion_window,
        created_at=record.created_at,
        expires_at=record.expires_at,
        metadata=record.metadata,
        cancelling_at=record.cancelling_at,
    )
    if record.validation_errors is not None:
        return Batch(**fields, status="failed", failed_at=record.failed_at, errors=BatchErrors(data=record.validation_errors))
    if record.outcome is not None:
        return _from_outcome(record, record.outcome, fields)
    if run is None:
        return Batch(**fields, status="cancelling" if record.cancelling_at else "validating")
    status = run_status(record, run)
    batch = Batch(
        **fields,
        status=status,
        in_progress_at=_seconds(run.started_at),
        finalizing_at=_seconds(run.finalizing_at),
        output_file_id=output_file_id,
        error_file_id=error_file_id,
    )
    if progress is not None:
        batch.request_counts = progress.counts()
        batch.usage = progress.usage()
    ended = _seconds(run.ended_at if run.ended_at is not None else run.state_at)
    if status == "cancelling" and batch.cancelling_at is None:
        batch.cancelling_at = _seconds(run.state_at)  # cancelled from the Prefect UI or CLI
    if status == "completed":
        batch.completed_at = ended
    elif status == "cancelled":
        batch.cancelled_at = ended
    elif status == "expired":
        batch.expired_at = record.expired_at
    elif status == "failed":
        batch.failed_at = ended
        batch.errors = BatchErrors(data=[BatchError(code="batch_failed", message=run.message or "the batch's run failed")])
    return batch


def outcome_of(
    record: BatchRecord,
    run: RunView,
    progress: Progress,
    output_file_id: str | None,
    error_file_id: str | None,
) -> Outcome:
    """What to store once the run is over (`run.state` final)."""
    return Outcome(
        status=run_status(record, run),
        counts=progress.counts(),
        usage=progress.usage(),
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        in_progress_at=_seconds(run.started_at),
        finalizing_at=_seconds(run.finalizing_at),
        ended_at=_seconds(run.ended_at if run.ended_at is not None else run.state_at) or 0,
        message=run.message,
    )


def _from_outcome(record: BatchRecord, outcome: Outcome, fields: dict[str, Any]) -> Batch:
    batch = Batch(
        **fields,
        status=outcome.status,
        request_counts=outcome.counts,
        usage=outcome.usage,
        output_file_id=outcome.output_file_id,
        error_file_id=outcome.error_file_id,
        in_progress_at=outcome.in_progress_at,
        finalizing_at=outcome.finalizing_at,
    )
    if outcome.status == "completed":
        batch.completed_at = outcome.ended_at
    elif outcome.status == "cancelled":
        batch.cancelled_at = outcome.ended_at
    elif outcome.status == "expired":
        batch.expired_at = record.expired_at
    elif outcome.status == "failed":
        batch.failed_at = outcome.ended_at
        batch.errors = BatchErrors(data=[BatchError(code="batch_failed", message=outcome.message or "the batch's run failed")])
    return batch


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)
