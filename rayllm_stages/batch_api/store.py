"""Where the Batch API keeps everything: one fsspec location (a local folder, s3://, ...), nothing in memory.

    <root>/files/<file id>.json          a file's record (FileRecord)
    <root>/files/<file id>.jsonl         an uploaded file's bytes
    <root>/batches/<batch id>.json       a batch's record (BatchRecord)
    <root>/batches/<batch id>/           the batch job's output: results.jsonl, errors.jsonl,
                                         manifest.json, _rayllm/ (the run log it resumes from)
    <root>/active/<batch id>             a batch whose run is not over yet (what the sweeper looks at)

Ids sort by creation time (a millisecond clock, then randomness), so a listing needs no record reads
to be in order. The batch job reads its input and writes its output here too: a worker must reach
the same location (use object storage when the workers are other machines).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import IO, Any

from prefect_rayllm.rayllm_stages.batch_api.objects import BatchRecord, FileRecord
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.run_log import PartStats, RunLog

CHUNK = 1 << 20


def new_id(prefix: str) -> str:
    """`prefix` + 12 hex digits of milliseconds + 12 random hex digits: later ids sort after earlier ones."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class BatchApiStore:
    """Files, batch records and batch outputs under one fsspec URL.

    Example:
        >>> store = BatchApiStore("s3://bucket/rayllm-api/", {"anon": False})
        >>> record = store.save_upload(open("requests.jsonl", "rb"), "requests.jsonl", "batch")
        >>> store.file(record.id).bytes
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.root = Location(url, dict(storage_options or {}))
        self.files_dir = self.root.child("files")
        self.batches_dir = self.root.child("batches")
        self.active_dir = self.root.child("active")

    # -- files ------------------------------------------------------------------------------
    def save_upload(self, stream: IO[bytes], filename: str, purpose: str) -> FileRecord:
        """Copy an upload into the store (in chunks) and record it."""
        file_id = new_id("file-")
        content = self.files_dir.child(f"{file_id}.jsonl")
        size = 0
        with content.open("wb") as out:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
        record = FileRecord(
            id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose, url=content.url
        )
        self.write_file(record)
        return record

    def write_file(self, record: FileRecord) -> None:
        self._file_record(record.id).write_text(record.model_dump_json())

    def file(self, file_id: str) -> FileRecord | None:
        """The record of a file that exists (None when unknown or deleted)."""
        if not _safe(file_id):
            return None
        location = self._file_record(file_id)
        if not location.exists():
            return None
        record = FileRecord.model_validate_json(location.read_text())
        return None if record.deleted else record

    def has_record(self, file_id: str) -> bool:
        """A record exists, a deleted file's tombstone included."""
        return _safe(file_id) and self._file_record(file_id).exists()

    def files(self) -> list[FileRecord]:
        """Every file that exists, oldest first."""
        records = []
        for location in self.files_dir.list_files(".json"):
            record = FileRecord.model_validate_json(location.read_text())
            if not record.deleted:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def delete_file(self, record: FileRecord) -> None:
        """Remove the bytes; keep a tombstone so that a batch's output file is not recorded again."""
        Location(record.url, self.root.storage_options).remove()
        self.write_file(record.model_copy(update={"deleted": True}))

    def open_content(self, record: FileRecord) -> Iterator[bytes]:
        """The file's bytes, in chunks."""
        with Location(record.url, self.root.storage_options).open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def _file_record(self, file_id: str) -> Location:
        return self.files_dir.child(f"{file_id}.json")

    # -- batches ----------------------------------------------------------------------------
    def output_url(self, batch_id: str) -> str:
        return self.batches_dir.child(batch_id).url.rstrip("/") + "/"

    def write_batch(self, record: BatchRecord) -> None:
        self.batches_dir.child(f"{record.id}.json").write_text(record.model_dump_json())

    def batch(self, batch_id: str) -> BatchRecord | None:
        if not _safe(batch_id):
            return None
        location = self.batches_dir.child(f"{batch_id}.json")
        return BatchRecord.model_validate_json(location.read_text()) if location.exists() else None

    def batch_ids(self) -> list[str]:
        """Every batch id, newest first."""
        names = [location.path.rsplit("/", 1)[-1] for location in self.batches_dir.list_files(".json")]
        return sorted((name.removesuffix(".json") for name in names), reverse=True)

    def mark_active(self, batch_id: str) -> None:
        self.active_dir.child(batch_id).write_text("")

    def unmark_active(self, batch_id: str) -> None:
        self.active_dir.child(batch_id).remove()

    def active_ids(self) -> list[str]:
        return sorted(location.path.rsplit("/", 1)[-1] for location in self.active_dir.list_files())

    # -- a batch's job output ----------------------------------------------------------------
    def output(self, record: BatchRecord) -> Location:
        return Location(record.output_url, self.root.storage_options)

    def manifest(self, record: BatchRecord) -> dict[str, Any] | None:
        location = self.output(record).child("manifest.json")
        return location.read_json() if location.exists() else None

    def committed(self, record: BatchRecord) -> PartStats:
        """What the job's run log has committed so far (read only: safe while the job writes)."""
        return RunLog(self.output(record)).committed_stats()

    def write_partial_outputs(self, record: BatchRecord) -> tuple[Location, Location, PartStats]:
        """A run that ended early (cancelled, expired, failed): its committed rows as results and errors files."""
        folder = self.output(record).child("partial")
        results, errors = folder.child("results.jsonl"), folder.child("errors.jsonl")
        stats, _ = RunLog(self.output(record)).merge(results, errors)
        return results, errors, stats


def _safe(identifier: str) -> bool:
    """An id as this store makes them: no path separators or dots that could leave the folder."""
    return bool(identifier) and all(c.isalnum() or c in "-_" for c in identifier)
