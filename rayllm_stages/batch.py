"""Batch inference without Prefect: prepare -> execute -> finalize, each step safe to repeat.

    input rows --(checked, already-done rows skipped)--> Ray Dataset [row_index, row_key, payload_json]
      --> ray.data.llm processor (vLLM or HTTP) --> driver: results / errors --> committed parts
      --> finalize: results.jsonl + errors.jsonl + manifest.json

The state lives in the output location, so any step can run again after a crash: `execute`
skips rows already committed, `finalize` rebuilds the final files from the parts.

Example:
    >>> job = BatchJob(BatchJobConfig(input="requests.jsonl", output="out/", model={"source": "./tiny"}))
    >>> job.prepare()
    >>> job.execute()
    >>> manifest = job.finalize()
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from .batch_input import InputFormat, Request, RowError, check_input, count_rows, read_requests
from .batch_output import OpenAIBatchFormat, TableFormat
from .config import BatchJobConfig, ConfigError
from .engines import build_engine_processor, engine_error_of
from .manifest import Manifest, Timings, build_counts, build_throughput
from .run_log import RunLog
from .storage import Location

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def rows_per_block(batch_size: int) -> int:
    """Small input blocks: Ray Data hands results back a block at a time, so block size is how
    often rows reach the driver (progress, commits); two engine batches per block keeps it fine."""
    return max(8, min(1024, 2 * batch_size))


class ResumeRefused(ConfigError):
    """The output location holds a run made with other settings."""


@dataclass
class Preparation:
    """What `prepare` found: the input's shape and how much is already done."""

    input_format: InputFormat
    total_rows: int
    done_rows: int
    already_complete: bool
    resumed: bool


@dataclass
class Execution:
    """What one `execute` call did."""

    attempt: int
    rows: int
    results: int
    errors: int
    seconds: float
    first_result_s: float | None


class BatchJob:
    """One batch job bound to its output location."""

    def __init__(self, config: BatchJobConfig, *, api_key: str | None = None):
        self.config = config
        self.api_key = api_key
        self.output = Location(config.output, config.storage_options)
        self.log = RunLog(self.output)
        self.results_file = self.output.child("results.jsonl")
        self.errors_file = self.output.child("errors.jsonl")
        self.manifest_file = self.output.child("manifest.json")

    # -- prepare ---------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> Preparation:
        """Check the input against the config, then start, resume or refuse.

        Raises:
            ConfigError: the input is missing or does not fit the config (field named).
            ResumeRefused: the output holds a run with other settings and `overwrite` is False.
        """
        input_format = check_input(self.config)
        fingerprint = self._fingerprint()
        job = self.log.read_job()
        if job is not None and job["fingerprint"] != fingerprint and not overwrite:
            changes = _describe_changes(job["fingerprint"], fingerprint)
            raise ResumeRefused(
                f"output {self.config.output} holds a run with other settings ({changes}); "
                "rerun with overwrite (--overwrite) to start over, or choose another output"
            )
        if overwrite or job is None:
            self._clear_outputs()
            job = {
                "fingerprint": fingerprint,
                "input_format": input_format,
                "total_rows": count_rows(self.config, input_format),
                "created_at": time.time(),
            }
            self.log.write_job(job)
        already_complete = self._completed_manifest() is not None
        done = job["total_rows"] if already_complete else len(self.log.done_indexes())
        return Preparation(
            input_format=job["input_format"],
            total_rows=job["total_rows"],
            done_rows=done,
            already_complete=already_complete,
            resumed=done > 0 and not already_complete,
        )

    # -- execute ---------------------------------------------------------------------------
    def execute(self, on_progress: ProgressCallback | None = None) -> Execution:
        """Run every row that is not yet committed; commit finished rows in parts as they come."""
        import ray

        job = self._job()
        started = time.time()
        done = self.log.done_indexes()
        attempt = self.log.next_attempt()
        writer = self.log.writer(attempt, self.config.commit_every_rows)
        formatter = self._formatter()
        total, finished = job["total_rows"], len(done)
        results = errors = 0
        first_result_at: float | None = None

        def report() -> None:
            if on_progress:
                on_progress(finished, total)

        refs, buffer, pending = [], [], 0
        block_rows = rows_per_block(self.config.model.batch_size)
        try:
            for item in read_requests(self.config, job["input_format"]):
                if item.index in done:
                    continue
                if isinstance(item, RowError):
                    writer.add_error(item.index, formatter.input_error(item), item.code)
                    errors += 1
                    finished += 1
                    continue
                buffer.append(item)
                pending += 1
                if len(buffer) == block_rows:
                    refs.append(ray.put(_to_arrow(buffer)))
                    buffer = []
            if buffer:
                refs.append(ray.put(_to_arrow(buffer)))
            report()
            if pending:
                dataset = ray.data.from_arrow_refs(refs)
                processor = build_engine_processor(self.config.model, api_key=self.api_key)
                for row in processor(dataset).iter_rows():
                    sampling = json.loads(row["payload_json"])["sampling"]
                    error = engine_error_of(row)
                    if error:
                        line, code = formatter.engine_error(row, error)
                        writer.add_error(row["row_index"], line, code)
                        errors += 1
                    else:
                        line = formatter.result(row, sampling)
                        writer.add_result(
                            row["row_index"], line, row["num_input_tokens"], row["num_generated_tokens"], row.get("latency_s")
                        )
                        results += 1
                        if first_result_at is None:
                            first_result_at = time.time()
                    finished += 1
                    if finished % 16 == 0 or finished == total:
                        report()
        finally:
            writer.commit()
        report()
        return Execution(
            attempt=attempt,
            rows=results + errors,
            results=results,
            errors=errors,
            seconds=round(time.time() - started, 3),
            first_result_s=round(first_result_at - started, 3) if first_result_at else None,
        )

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, *, flow_run_id: str | None = None, execution: Execution | None = None) -> Manifest:
        """Merge the parts into results.jsonl and errors.jsonl and write manifest.json."""
        completed = self._completed_manifest()
        if completed is not None:
            return completed
        job = self._job()
        stats, attempts = self.log.merge(self.results_file, self.errors_file)
        total = job["total_rows"]
        accounted = stats.results + stats.errors
        if accounted != total:
            raise RuntimeError(
                f"{total - accounted} of {total} input rows are neither in results nor in errors; "
                "run execute again to finish them"
            )
        finished_at = time.time()
        wall = max(sum(a["seconds"] for a in attempts), 1e-6)
        manifest = Manifest(
            status="completed",
            input={"url": self.config.input, "format": job["input_format"], **job["fingerprint"]["input_identity"]},
            outputs={
                "results": self.results_file.url,
                "errors": self.errors_file.url,
                "manifest": self.manifest_file.url,
            },
            model={
                "name": self.config.model.served_name,
                "source": self.config.model.source,
                "engine": self.config.model.engine,
                "engine_kwargs": self.config.model.engine_kwargs,
                "concurrency": self.config.model.concurrency,
                "batch_size": self.config.model.batch_size,
            },
            sampling=self.config.sampling.model_dump(),
            prompt_template_hash=self.config.prompt.digest() if self.config.prompt else None,
            counts=build_counts(stats, total),
            timings=Timings(
                started_at=job["created_at"],
                finished_at=finished_at,
                wall_s=round(wall, 3),
                first_result_s=execution.first_result_s if execution else None,
            ),
            throughput=build_throughput(stats, wall),
            attempts=attempts,
            flow_run_id=flow_run_id,
            max_error_rate=self.config.max_error_rate,
        )
        self.manifest_file.write_json(manifest.model_dump(mode="json"))
        self.log.clear_parts()
        return manifest

    # -- helpers ---------------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        job = self.log.read_job()
        if job is None:
            raise RuntimeError(f"no job at {self.config.output}: call prepare() first")
        return job

    def _fingerprint(self) -> dict[str, Any]:
        identity = Location(self.config.input, self.config.storage_options).identity()
        return {**self.config.resume_fingerprint(), "input_identity": identity}

    def _completed_manifest(self) -> Manifest | None:
        if not self.manifest_file.exists():
            return None
        return Manifest.model_validate(self.manifest_file.read_json())

    def _formatter(self) -> OpenAIBatchFormat | TableFormat:
        if self._job()["input_format"] == "openai_batch":
            return OpenAIBatchFormat(self.config.model.served_name, run_key=self.config.output)
        return TableFormat()

    def _clear_outputs(self) -> None:
        for location in (self.results_file, self.errors_file, self.manifest_file):
            location.remove()
        self.log.clear()


def _to_arrow(requests: list[Request]):
    import pyarrow as pa

    return pa.table(
        {
            "row_index": pa.array([r.index for r in requests], pa.int64()),
            "row_key": pa.array([r.key for r in requests], pa.string()),
            "payload_json": pa.array(
                [json.dumps({"messages": r.messages, "sampling": r.sampling, "row": r.row}, default=str) for r in requests],
                pa.string(),
            ),
        }
    )


def _describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    parts = []
    for key in changed:
        if key == "input_identity":
            parts.append("the input file changed")
        else:
            parts.append(f"{key}: {json.dumps(old.get(key), default=str)} -> {json.dumps(new.get(key), default=str)}")
    return "; ".join(parts)
