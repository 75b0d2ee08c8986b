"""What every LLM job shares: prepare -> execute -> finalize against one output location.

A job streams its input rows (checked, already-done rows skipped) into a Ray Dataset, runs its
pipeline of `ray.data.llm` processors, and commits every finished row, result or error, to the run
log as it arrives in the driver. Finalize merges the log into results.jsonl, errors.jsonl and
manifest.json. All state lives in the output location, so each step can run again after a crash.

Subclasses say what is specific: how the input is checked and read (`check_input`, `input_rows`,
`count_rows`), what the pipeline is (`pipeline`), and how rows are written (`formatter`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest, Timings, build_counts, build_throughput
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog
from prefect_rayllm.rayllm_stages.llm.engines import build_engine_processor, cluster_has_gpu, engine_error_of

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class ResumeRefused(ConfigError):
    """The output location holds a run made with other settings."""


@dataclass
class InputRow:
    """One input row ready for the pipeline: its Dataset columns."""

    index: int
    key: str
    columns: dict[str, Any]


@dataclass
class Preparation:
    """What `prepare` found: the input's shape and how much is already done."""

    input_format: str
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


def rows_per_block(batch_size: int) -> int:
    """Small input blocks: Ray Data hands results back a block at a time, so block size is how
    often rows reach the driver (progress, commits); two engine batches per block keeps it fine."""
    return max(8, min(1024, 2 * batch_size))


class LLMJob:
    """Base of `BatchJob` and `ChainJob`; `config` has input, output, storage_options,
    commit_every_rows, max_error_rate and `resume_fingerprint()`."""

    kind = "job"

    def __init__(self, config: Any, *, api_key: str | None = None):
        self.config = config
        self.api_key = api_key
        self.output = Location(config.output, config.storage_options)
        self.log = RunLog(self.output)
        self.results_file = self.output.child("results.jsonl")
        self.errors_file = self.output.child("errors.jsonl")
        self.manifest_file = self.output.child("manifest.json")
        self._served_engines: dict[str, tuple[Any, bool]] = {}  # Serve app -> (engine, keep_serving)
        self.engines_used: list[Any] = []  # every ServedEngine this job used, for the manifest

    # -- what subclasses define ------------------------------------------------------------
    def check_input(self) -> str:
        raise NotImplementedError

    def count_rows(self, input_format: str) -> int:
        raise NotImplementedError

    def input_rows(self, input_format: str) -> Iterator[InputRow | RowError]:
        raise NotImplementedError

    def pipeline(self, refs: list[Any], attempt: int):
        """The processed Dataset for the input blocks `refs` (lazy)."""
        raise NotImplementedError

    def formatter(self, input_format: str):
        raise NotImplementedError

    def block_rows(self) -> int:
        raise NotImplementedError

    def manifest_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def step_usage(self, row: dict[str, Any]) -> tuple[int, int, float | None]:
        """Tokens in, tokens out and latency of a result row."""
        return row["num_input_tokens"], row["num_generated_tokens"], row.get("latency_s")

    def per_step_usage(self, row: dict[str, Any]) -> dict[str, dict[str, int]] | None:
        """Chains: tokens per step of a result row."""
        return None

    def failed_step(self, row: dict[str, Any]) -> str | None:
        """Chains: the step an error row failed in."""
        return None

    def step_summaries(self, stats) -> list[dict[str, Any]] | None:
        return None

    def processor_for(self, spec: ModelSpec, step: Any = None, api_key: str | None = None, cpu_cores: str | None = None):
        """The processor for one model; a Serve-hosted engine is deployed (or found) once per job."""
        served = None
        if spec.engine == "serve":
            from prefect_rayllm.rayllm_stages.llm.serve_engine import ensure_engine

            app = spec.serve_app_name
            if app not in self._served_engines:
                engine = ensure_engine(spec, cluster_has_gpu())
                self._served_engines[app] = (engine, spec.keep_serving)
                self.engines_used.append(engine)
                self.log.record_engine(asdict(engine))
            served = self._served_engines[app][0]
        return build_engine_processor(spec, step, api_key=api_key, served=served, cpu_cores=cpu_cores)

    def release_engines(self) -> None:
        """Delete the Serve engines this job deployed (unless kept); a retry deploys them again."""
        from prefect_rayllm.rayllm_stages.llm.serve_engine import release_engine

        for engine, keep in self._served_engines.values():
            release_engine(engine, keep)
        self._served_engines.clear()

    # -- prepare ---------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> Preparation:
        """Check the input against the config, then start, resume or refuse.

        Raises:
            ConfigError: the input is missing or does not fit the config (field named).
            ResumeRefused: the output holds a run with other settings and `overwrite` is False.
        """
        input_format = self.check_input()
        fingerprint = self._fingerprint()
        job = self.log.read_job()
        if job is not None and job["fingerprint"] != fingerprint and not overwrite:
            changes = describe_changes(job["fingerprint"], fingerprint)
            raise ResumeRefused(
                f"output {self.config.output} holds a run with other settings ({changes}); "
                "rerun with overwrite (--overwrite) to start over, or choose another output"
            )
        if overwrite or job is None:
            self._clear_outputs()
            job = {
                "kind": self.kind,
                "fingerprint": fingerprint,
                "input_format": input_format,
                "total_rows": self.count_rows(input_format),
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
        formatter = self.formatter(job["input_format"])
        total, finished = job["total_rows"], len(done)
        results = errors = 0
        first_result_at: float | None = None

        def report() -> None:
            if on_progress:
                on_progress(finished, total)

        refs, buffer, pending = [], [], 0
        block_rows = self.block_rows()
        try:
            for item in self.input_rows(job["input_format"]):
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
                for row in self.pipeline(refs, attempt).iter_rows():
                    error = engine_error_of(row)
                    if error:
                        line, code = formatter.engine_error(row, error)
                        writer.add_error(row["row_index"], line, code, self.failed_step(row), self.per_step_usage(row))
                        errors += 1
                    else:
                        tokens_in, tokens_out, latency = self.step_usage(row)
                        writer.add_result(
                            row["row_index"], formatter.result(row), tokens_in, tokens_out, latency, self.per_step_usage(row)
                        )
                        results += 1
                        if first_result_at is None:
                            first_result_at = time.time()
                    finished += 1
                    if finished % 16 == 0 or finished == total:
                        report()
        finally:
            writer.commit()
            self.release_engines()
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
        wall = max(sum(a["seconds"] for a in attempts), 1e-6)
        manifest = Manifest(
            status="completed",
            job=self.kind,
            input={"url": self.config.input, "format": job["input_format"], **job["fingerprint"]["input_identity"]},
            outputs={
                "results": self.results_file.url,
                "errors": self.errors_file.url,
                "manifest": self.manifest_file.url,
            },
            counts=build_counts(stats, total),
            timings=Timings(
                started_at=job["created_at"],
                finished_at=time.time(),
                wall_s=round(wall, 3),
                first_result_s=execution.first_result_s if execution else None,
            ),
            throughput=build_throughput(stats, wall),
            attempts=attempts,
            flow_run_id=flow_run_id,
            max_error_rate=self.config.max_error_rate,
            steps=self.step_summaries(stats),
            engines=self.log.read_engines(),
            **self.manifest_fields(),
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

    def _clear_outputs(self) -> None:
        for location in (self.results_file, self.errors_file, self.manifest_file):
            location.remove()
        self.log.clear()


def _to_arrow(rows: list[InputRow]):
    import pyarrow as pa

    columns: dict[str, list[Any]] = {"row_index": [r.index for r in rows], "row_key": [r.key for r in rows]}
    for name in rows[0].columns:
        columns[name] = [r.columns[name] for r in rows]
    return pa.table(columns)


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    parts = []
    for key in changed:
        if key == "input_identity":
            parts.append("the input file changed")
        else:
            parts.append(f"{key}: {json.dumps(old.get(key), default=str)} -> {json.dumps(new.get(key), default=str)}")
    return "; ".join(parts)
