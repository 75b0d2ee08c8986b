"""What the Files and Batches endpoints do, without HTTP: upload, check, run, observe, cancel, sweep.

Nothing is kept in memory between calls: a batch is its record in the store, its Prefect flow run
and its job's output folder, so any API process (a restarted one, another replica) answers the same.

Observing a batch that is not over also keeps it moving: past its completion window its run is
cancelled (status `expired`); a run whose process is gone is put back in the queue (`runs.py`);
once the run is over, its output and error files are recorded and the outcome is written into the
batch's record. The sweeper (`sweep`) observes every active batch periodically, so this happens
whether or not anyone polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from prefect_rayllm.flows.api.config import ApiConfig
from prefect_rayllm.flows.api.runs import FINAL_STATES, BatchRuns, flow_runs_alive_here
from prefect_rayllm.rayllm_stages.batch_api.checks import check_batch_file
from prefect_rayllm.rayllm_stages.batch_api.objects import (
    FINAL_STATUSES,
    SUPPORTED_ENDPOINTS,
    Batch,
    BatchError,
    BatchRecord,
    FileDeleted,
    FileObject,
    FileRecord,
    Outcome,
    Page,
    Progress,
    RunView,
    describe_batch,
    outcome_of,
    page,
    window_seconds,
)
from prefect_rayllm.rayllm_stages.batch_api.store import BatchApiStore, new_id
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.tasks.blocks import storage_options_with_block

logger = logging.getLogger("prefect_rayllm.api")

UPLOAD_PURPOSES = ("batch",)
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass
class ApiError(Exception):
    """An error as OpenAI's API returns it: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(kind: str, identifier: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {kind}: {identifier!r}", param=param, code="not_found")


class BatchService:
    """The Files and Batches operations over one store and one batch deployment."""

    def __init__(self, config: ApiConfig, runs: BatchRuns, store: BatchApiStore | None = None):
        self.config = config
        self.runs = runs
        # the block's secret stays in this process: batch runs get the block's name (`job_config`)
        self.storage_options = storage_options_with_block(config.storage_block, config.storage_options)
        self.store = store or BatchApiStore(config.storage, self.storage_options)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- files ------------------------------------------------------------------------------
    def upload(self, stream: IO[bytes], filename: str, purpose: str) -> FileObject:
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(
                400, f"purpose {purpose!r} is not supported here (supported: {', '.join(UPLOAD_PURPOSES)})", param="purpose"
            )
        record = self.store.save_upload(stream, filename or "upload.jsonl", purpose)
        logger.info("file %s uploaded (%s, %d bytes)", record.id, record.filename, record.bytes)
        return record.to_object()

    def file(self, file_id: str) -> FileObject:
        return self._file_record(file_id).to_object()

    def files(self, after: str | None = None, limit: int = 10000, order: str = "desc", purpose: str | None = None) -> Page:
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', not {order!r}", param="order")
        if not 1 <= limit <= 10000:
            raise ApiError(400, "limit must be between 1 and 10000", param="limit")
        records = [r for r in self.store.files() if purpose is None or r.purpose == purpose]
        if order == "desc":
            records.reverse()
        return page([r.to_object() for r in records], limit, after)

    def delete_file(self, file_id: str) -> FileDeleted:
        record = self._file_record(file_id)
        self.store.delete_file(record)
        logger.info("file %s deleted", file_id)
        return FileDeleted(id=file_id)

    def content(self, file_id: str) -> tuple[FileRecord, Iterator[bytes]]:
        record = self._file_record(file_id)
        return record, self.store.open_content(record)

    def _file_record(self, file_id: str) -> FileRecord:
        record = self.store.file(file_id)
        if record is None:
            raise not_found("file", file_id, "file_id")
        return record

    # -- batches ----------------------------------------------------------------------------
    def create_batch(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str] | None = None
    ) -> Batch:
        """Check the input file whole, then create the batch's flow run; a bad file fails the batch at once."""
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise ApiError(
                400, f"endpoint {endpoint!r} is not supported (supported: {', '.join(SUPPORTED_ENDPOINTS)})", param="endpoint"
            )
        try:
            window_seconds(completion_window)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="completion_window") from None
        _check_metadata(metadata)
        source = self.store.file(input_file_id)
        if source is None:
            raise not_found("file", input_file_id, "input_file_id")
        if source.purpose != "batch":
            raise ApiError(400, f"file {input_file_id} has purpose {source.purpose!r}, not 'batch'", param="input_file_id")
        batch_id = new_id("batch_")
        record = BatchRecord(
            id=batch_id,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            created_at=int(time.time()),
            output_url=self.store.output_url(batch_id),
        )
        try:
            checked = check_batch_file(source.url, self.config.models, self.storage_options, self.config.sampling)
        except (UnicodeDecodeError, OSError) as exc:
            record.validation_errors = [BatchError(code="invalid_file", message=f"the input file cannot be read as text: {exc}")]
        else:
            record.model, record.total_requests = checked.model, checked.requests
            if not checked.ok:
                record.validation_errors = checked.errors
        if record.validation_errors is not None:
            record.failed_at = int(time.time())
            self.store.write_batch(record)
            logger.info("batch %s failed validation: %d bad lines", batch_id, len(record.validation_errors))
            return describe_batch(record)
        self.store.write_batch(record)
        self.store.mark_active(batch_id)
        try:
            self._submit(record, source)
        except Exception as exc:  # no run: the batch fails now, rather than start later unseen
            message = exc.message if isinstance(exc, ApiError) else f"its flow run could not be created: {exc}"
            record.validation_errors = [BatchError(code="run_not_created", message=message)]
            record.failed_at = int(time.time())
            self.store.write_batch(record)
            self.store.unmark_active(batch_id)
            raise
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> Batch:
        record = self.store.batch(batch_id)
        if record is None:
            raise not_found("batch", batch_id, "batch_id")
        return self.observe(record)

    def batches(self, after: str | None = None, limit: int = 20) -> Page:
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be between 1 and 100", param="limit")
        ids = self.store.batch_ids()
        if after is not None:
            ids = [i for i in ids if i < after]  # ids sort by creation: the ones created before `after`
        chosen = ids[: limit + 1]
        items = [self.batch(i) for i in chosen[:limit]]
        listed = page(items, limit, None)
        listed.has_more = len(chosen) > limit
        return listed

    def cancel(self, batch_id: str) -> Batch:
        """Cancel a batch that is not over: its run is cancelled (the finished requests stay in its output file)."""
        current = self.batch(batch_id)
        if current.status in FINAL_STATUSES:
            raise ApiError(409, f"batch {batch_id} is {current.status} and cannot be cancelled", code="batch_not_cancellable")
        with self._lock(batch_id):
            record = self.store.batch(batch_id)
            assert record is not None
            if record.cancelling_at is None:
                record.cancelling_at = int(time.time())
                self.store.write_batch(record)
            if record.flow_run_id is not None:
                self.runs.cancel(record.flow_run_id, "cancelled through the Batch API")
        logger.info("batch %s: cancel requested", batch_id)
        return self.batch(batch_id)

    def sweep(self) -> None:
        """Observe every batch whose run is not over (expiry, recovery, outputs); errors are logged."""
        try:
            alive = flow_runs_alive_here() if self.runs.serving_since is not None else set()
            ids = self.store.active_ids()
        except Exception:
            logger.exception("sweep: cannot list the active batches")
            return
        for batch_id in ids:
            try:
                record = self.store.batch(batch_id)
                if record is None or record.outcome is not None or record.validation_errors is not None:
                    self.store.unmark_active(batch_id)
                    continue
                self.observe(record, alive_here=alive, sweeping=True)
            except Exception:
                logger.exception("sweep: batch %s", batch_id)

    # -- observing --------------------------------------------------------------------------
    def observe(self, record: BatchRecord, alive_here: set[str] | None = None, sweeping: bool = False) -> Batch:
        """The batch as it is now; keeps it moving (see the module docstring)."""
        if record.validation_errors is not None or record.outcome is not None:
            return describe_batch(record)
        with self._lock(record.id):
            record = self.store.batch(record.id) or record  # what another thread wrote meanwhile
            if record.outcome is not None:
                return describe_batch(record)
            if record.flow_run_id is None:  # the process stopped between the record and the run
                record = self._submit(record)
                if record.flow_run_id is None:  # its input file was deleted meanwhile
                    self.store.unmark_active(record.id)
                    return describe_batch(record)
            seen = self.runs.seen(record.flow_run_id, with_heartbeat=sweeping)
            if seen is None:
                return self._conclude_without_run(record)
            view = seen.view
            now = time.time()
            if view.state not in FINAL_STATES and record.expired_at is None and now >= record.expires_at:
                record.expired_at = int(now)
                self.store.write_batch(record)
                self.runs.cancel(record.flow_run_id, f"the batch's completion window ({record.completion_window}) ran out")
                logger.info("batch %s expired", record.id)
                seen = self.runs.seen(record.flow_run_id) or seen
            elif self._crashed(record, view) or (sweeping and self.runs.is_orphaned(seen, alive_here, record.flow_run_id)):
                record = self._recover(record, view)
                seen = self.runs.seen(record.flow_run_id) or seen
            view = seen.view
            if view.state == "CRASHED" and (record.cancelling_at is not None or record.expired_at is not None):
                # Stopping the process made it report Crashed first: it was cancelled, and Prefect says so too.
                why = "its completion window ran out" if record.expired_at is not None else "cancelled through the Batch API"
                self.runs.end(record.flow_run_id, "CANCELLING", f"rayllm api: {why}")
                seen = self.runs.seen(record.flow_run_id) or seen
                view = seen.view
            if view.state in FINAL_STATES:
                return self._conclude(record, view)
            return describe_batch(record, view, self._progress(record))

    def _progress(self, record: BatchRecord) -> Progress:
        manifest = self.store.manifest(record)
        if manifest is not None:  # finalizing: the parts are merged (and then removed)
            return _manifest_progress(manifest)
        stats = self.store.committed(record)
        return Progress(
            total=record.total_requests,
            completed=stats.results,
            failed=stats.errors,
            tokens_in=stats.tokens_in,
            tokens_out=stats.tokens_out,
        )

    def _crashed(self, record: BatchRecord, view: RunView) -> bool:
        """A run that crashed (its process was killed, or its machine went away) and may be resumed.

        Crashed is Prefect's state for a run whose infrastructure failed, not the flow (that is
        Failed): a SIGTERM'd flow process reports it on its way out. Prefect retries only Failed.
        """
        return (
            view.state == "CRASHED"
            and record.cancelling_at is None
            and record.expired_at is None
            and record.resumes < self.config.max_resumes
        )

    def _recover(self, record: BatchRecord, view: RunView) -> BatchRecord:
        """Queue a run whose process is gone again (it resumes from its committed rows), or end it:
        Cancelled when it was being cancelled, Crashed when it was resumed `max_resumes` times."""
        assert record.flow_run_id is not None
        stopping = view.state == "CANCELLING" or record.cancelling_at is not None or record.expired_at is not None
        if stopping or record.resumes >= self.config.max_resumes:
            if view.state == "CRASHED":
                return record  # over: concluded as failed
            reason = (
                "the process cancelling it is gone"
                if stopping
                else f"its process is gone and it was resumed {record.resumes} times already"
            )
            self.runs.end(record.flow_run_id, "CANCELLING" if stopping else view.state, f"rayllm api: {reason}")
            logger.warning("batch %s: run %s ended (%s)", record.id, record.flow_run_id, reason)
            return record
        record.resumes += 1
        self.store.write_batch(record)
        gone = "crashed" if view.state == "CRASHED" else "lost the process running it"
        self.runs.requeue(
            record.flow_run_id,
            f"rayllm api: the run {gone}; queued again (resume {record.resumes} of {self.config.max_resumes}), "
            "it resumes from its committed rows",
        )
        logger.warning("batch %s: run %s %s; queued again to resume", record.id, record.flow_run_id, gone)
        return record

    def _conclude(self, record: BatchRecord, view: RunView) -> Batch:
        """The run is over: record its output and error files and the outcome, once."""
        if view.state == "COMPLETED":
            manifest = self.store.manifest(record)
            if manifest is None:
                view.state, view.message = "FAILED", "the run completed but wrote no manifest.json"
                return self._conclude(record, view)
            progress = _manifest_progress(manifest)
            results, errors = (Location(manifest["outputs"][k], self.storage_options) for k in ("results", "errors"))
        else:  # cancelled, expired or failed: what it committed before it stopped
            results, errors, stats = self.store.write_partial_outputs(record)
            progress = Progress(record.total_requests, stats.results, stats.errors, stats.tokens_in, stats.tokens_out)
        output_id = self._output_file(record, "output", results) if progress.completed else None
        error_id = self._output_file(record, "errors", errors) if progress.failed else None
        record.outcome = outcome_of(record, view, progress, output_id, error_id)
        self.store.write_batch(record)
        self.store.unmark_active(record.id)
        logger.info(
            "batch %s %s: %d completed, %d failed of %d",
            record.id,
            record.outcome.status,
            progress.completed,
            progress.failed,
            progress.total,
        )
        return describe_batch(record)

    def _conclude_without_run(self, record: BatchRecord) -> Batch:
        record.outcome = Outcome(
            status="cancelled" if record.cancelling_at else "failed",
            counts=Progress(record.total_requests, 0, 0).counts(),
            ended_at=int(time.time()),
            message=f"its flow run {record.flow_run_id} no longer exists in the Prefect API",
        )
        self.store.write_batch(record)
        self.store.unmark_active(record.id)
        return describe_batch(record)

    def _output_file(self, record: BatchRecord, kind: str, content: Location) -> str:
        file_id = f"file-{record.id.removeprefix('batch_')}-{kind}"
        if not self.store.has_record(file_id):
            self.store.write_file(
                FileRecord(
                    id=file_id,
                    bytes=content.size(),
                    created_at=int(time.time()),
                    filename=f"{record.id}_{kind}.jsonl",
                    purpose="batch_output",
                    url=content.url,
                    batch_id=record.id,
                )
            )
        return file_id

    def _submit(self, record: BatchRecord, source: FileRecord | None = None) -> BatchRecord:
        source = source or self.store.file(record.input_file_id)
        if source is None:  # deleted before its run was created
            record.validation_errors = [BatchError(code="invalid_file", message=f"input file {record.input_file_id} was deleted")]
            record.failed_at = int(time.time())
            self.store.write_batch(record)
            return record
        try:
            record.flow_run_id = self.runs.submit(record.id, {"config": self.job_config(record, source), "overwrite": False})
        except LookupError as exc:
            raise ApiError(503, str(exc), code="deployment_not_found", type="server_error") from None
        self.store.write_batch(record)
        return record

    def job_config(self, record: BatchRecord, source: FileRecord) -> dict[str, Any]:
        """The batch deployment's `config` parameter for this batch (no key in it: models name theirs)."""
        assert record.model is not None
        spec = self.config.models[record.model].model_copy(update={"id": record.model})
        config = BatchJobConfig(
            input=source.url,
            output=record.output_url,
            input_format="openai_batch",
            model=spec,
            sampling=self.config.sampling,
            max_error_rate=1.0,  # failed requests go to the error file; the batch still completes
            storage_options=self.config.storage_options,
            storage_block=self.config.storage_block,
            ray_address=self.config.ray_address,
            ray_block=self.config.ray_block,
            commit_every_rows=self.config.commit_every_rows,
        )
        return config.model_dump(mode="json", exclude_defaults=True)

    def _lock(self, batch_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(batch_id, threading.Lock())


def _manifest_progress(manifest: dict[str, Any]) -> Progress:
    counts, throughput = manifest["counts"], manifest["throughput"]
    return Progress(
        total=counts["total"],
        completed=counts["completed"],
        failed=counts["failed"],
        tokens_in=throughput["tokens_in"],
        tokens_out=throughput["tokens_out"],
    )


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        raise ApiError(400, f"metadata must be an object of at most {MAX_METADATA_KEYS} keys", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > MAX_METADATA_KEY:
            raise ApiError(400, f"metadata keys are strings of at most {MAX_METADATA_KEY} characters", param="metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise ApiError(
                400, f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE} characters", param="metadata"
            )
