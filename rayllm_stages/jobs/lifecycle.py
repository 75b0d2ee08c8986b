"""The resumable job lifecycle that batch, chain and curation share: prepare -> execute -> finalize
against one output location, with all state in its run log (`<output>/_rayllm/`), so each step can
run again after a crash.

    prepare(overwrite)   check the input; read the job record: start (write it), resume, or refuse
                         when the settings changed (`ResumeRefused` names each change) unless
                         `overwrite`, which clears the outputs and the log       -> Preparation
    execute(on_progress) every row not yet committed, through the job's `work`; finished rows
                         (results and errors) are committed in parts as they arrive; progress is
                         reported at a fixed cadence (`Progress`)                 -> Execution
    finalize()           the job's outputs and one `Manifest` (jobs.manifest), written last -> Manifest
    run()                all three

A job (`ResumableJob` subclass) says what is its own: the settings its rows depend on
(`fingerprint`), how the input is checked and counted (`check_input`, `count_rows`), the rows it
has done (`done_rows`), the work that yields finished rows (`work`), its output files
(`output_files`) and how they and the manifest are written (`write_outputs`). An `incremental` job
(curation) finalizes again on every run, over whatever its source lists now, and keeps its run log.

`LLMJob` is the base of `BatchJob` and `ChainJob`: Ray workers read the input in shards (rows
checked, done rows skipped), run them through the job's `ray.data.llm` processors and commit the
finished rows as parts (`jobs.worker_io`); the driver sees one summary per block. Finalize merges
the parts into results.jsonl and errors.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from prefect_rayllm.rayllm_stages.config.base import ConfigError, with_credentials
from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.io.input_shards import SHARD_BYTES, Shard
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest, Timings, build_counts, build_throughput
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog
from prefect_rayllm.rayllm_stages.jobs.worker_io import (
    Committed,
    Finished,
    InputRow,
    any_runnable,
    check_nodes_see,
    commit_blocks,
    committed_of,
    input_error_of,
    plan_reading,
    read_dataset,
    run_on_a_worker,
)
from prefect_rayllm.rayllm_stages.llm.engines import build_engine_processor, cluster_has_gpu
from prefect_rayllm.rayllm_stages.llm.rows import failure_of
from prefect_rayllm.rayllm_stages.runtime.engine_stats import EngineTraces

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class ResumeRefused(ConfigError):
    """The output location holds a run with other settings."""


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
    engine: dict[str, Any] | None = None  # per LLM step: how full the engine was (runtime.engine_stats)


@dataclass
class Work:
    """What `execute` runs: how many rows the job has, how many are done, and the rest as they finish."""

    total: int
    done: int
    rows: Iterable[Finished | Committed]  # rows the driver commits, or blocks that workers committed


class Progress:
    """The progress cadence: at the start, every `every` finished rows, at the total, and at the end."""

    def __init__(self, callback: ProgressCallback | None, total: int, finished: int = 0, every: int = 16):
        self.callback, self.total, self.finished, self.every = callback, total, finished, every

    def report(self) -> None:
        if self.callback:
            self.callback(self.finished, self.total)

    def advance(self, rows: int = 1) -> None:
        before = self.finished
        self.finished += rows
        if self.finished // self.every > before // self.every or self.finished == self.total:
            self.report()


class ResumableJob:
    """prepare -> execute -> finalize over one output location (see the module docstring).

    `config` has `output`, `storage_options`, `commit_every_rows` and `resume_fingerprint()`.
    """

    kind: ClassVar[str] = "job"
    incremental: ClassVar[bool] = False  # finalize on every run over the input as listed now; keep the log

    def __init__(self, config: Any):
        self.config = config = with_credentials(config)  # a storage_block's options, in memory only
        self.output = Location(config.output, config.storage_options)
        self.log = RunLog(self.output)
        self.manifest_file = self.output.child("manifest.json")

    # -- what a job defines ----------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The settings a finished row depends on: a change refuses to resume."""
        return self.config.resume_fingerprint()

    def check_input(self) -> str:
        """Check the input against the config; return its format.

        Raises:
            ConfigError: the input is missing or does not fit the config (field named).
        """
        raise NotImplementedError

    def count_rows(self, input_format: str) -> int:
        raise NotImplementedError

    def done_rows(self, job: dict[str, Any]) -> int:
        """Rows of the input already committed."""
        return len(self.log.done_indexes())

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        """The rows not yet committed, as they finish (lazily: execute commits each as it comes)."""
        raise NotImplementedError

    def release(self) -> None:
        """Called when `execute` ends, finished or not (e.g. delete the engines it deployed)."""

    def engine_report(self) -> dict[str, Any] | None:
        """After `work`: per LLM step, how full its engine was (None: no engine timings)."""
        return None

    def output_files(self) -> list[Location]:
        """The files `write_outputs` writes besides manifest.json (removed on overwrite)."""
        raise NotImplementedError

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        """Write the job's outputs from the run log; return the manifest (the lifecycle writes it)."""
        raise NotImplementedError

    def after_finalize(self) -> None:
        """After manifest.json is written: drop what the log no longer needs."""
        if not self.incremental:
            self.log.clear_parts()

    # -- prepare ---------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> Preparation:
        """Check the input against the config, then start, resume or refuse.

        Raises:
            ConfigError: the input is missing or does not fit the config (field named).
            ResumeRefused: the output holds a run with other settings and `overwrite` is False.
        """
        input_format = self.check_input()
        job = self.check_resume(overwrite)
        if overwrite or job is None:
            self.clear()
            job = {
                "kind": self.kind,
                "fingerprint": self.fingerprint(),
                "input_format": input_format,
                "total_rows": self.count_rows(input_format),
                "created_at": time.time(),
            }
            self.log.write_job(job)
        total = self.count_rows(input_format) if self.incremental else job["total_rows"]
        already_complete = not self.incremental and self.completed_manifest() is not None
        done = total if already_complete else self.done_rows(job)
        return Preparation(
            input_format=job.get("input_format", input_format),
            total_rows=total,
            done_rows=done,
            already_complete=already_complete,
            resumed=done > 0 and not already_complete,
        )

    def check_resume(self, overwrite: bool = False) -> dict[str, Any] | None:
        """The output's job record (None: a new run), after checking that this config may resume it.

        Reads only the run log (and, when there is a record, what the fingerprint reads), so it
        can run before any runtime starts.

        Raises:
            ResumeRefused: the record was made with other settings (each change named) and not `overwrite`.
        """
        job = self.log.read_job()
        if job is None or overwrite:
            return job
        fingerprint = self.fingerprint()
        if job.get("fingerprint") != fingerprint:
            raise ResumeRefused(
                f"output {self.config.output} holds a {self.kind} run with other settings "
                f"({describe_changes(job.get('fingerprint') or {}, fingerprint)}); "
                "rerun with overwrite (--overwrite) to start over, or choose another output"
            )
        return job

    # -- execute ---------------------------------------------------------------------------
    def execute(self, on_progress: ProgressCallback | None = None) -> Execution:
        """Run every row that is not yet committed; commit finished rows in parts as they come.

        Raises:
            ResumeRefused: the settings changed since `prepare`.
        """
        job = self.job()
        if job["fingerprint"] != self.fingerprint():
            raise ResumeRefused(f"the settings changed since {self.config.output} was prepared; prepare again")
        started = time.time()
        attempt = self.log.next_attempt()
        writer = self.log.writer(attempt, self.config.commit_every_rows)
        work = self.work(job, attempt)
        progress = Progress(on_progress, work.total, work.done)
        results = errors = 0
        first_result_at: float | None = None
        try:
            progress.report()
            for row in work.rows:
                if isinstance(row, Committed):
                    results += row.results
                    errors += row.errors
                    if row.results and (first_result_at is None or row.committed_at < first_result_at):
                        first_result_at = row.committed_at  # on the parts' clock, as the attempt's span
                    progress.advance(row.rows)
                    continue
                if row.error_code is None:
                    writer.add_result(row.index, row.line, row.tokens_in, row.tokens_out, row.latency_s, row.step_usage)
                    results += 1
                    if first_result_at is None:
                        first_result_at = time.time()
                else:
                    writer.add_error(row.index, row.line, row.error_code, row.failed_step, row.step_usage)
                    errors += 1
                progress.advance()
        finally:
            writer.commit()
            self.release()
        progress.report()
        return Execution(
            attempt=attempt,
            rows=results + errors,
            results=results,
            errors=errors,
            seconds=round(time.time() - started, 3),
            first_result_s=round(first_result_at - started, 3) if first_result_at else None,
            engine=self.engine_report(),
        )

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, *, flow_run_id: str | None = None, execution: Execution | None = None) -> Manifest:
        """Write the outputs and manifest.json (a finished, non-incremental job: its manifest as is).

        Raises:
            RuntimeError: some rows are not committed yet (execute has not finished); nothing is written.
        """
        if not self.incremental:
            completed = self.completed_manifest()
            if completed is not None:
                return completed
        manifest = self.write_outputs(self.job(), execution, flow_run_id)
        self.manifest_file.write_json(manifest.model_dump(mode="json"))
        self.after_finalize()
        return manifest

    def run(self, overwrite: bool = False, on_progress: ProgressCallback | None = None) -> Manifest:
        """prepare, execute (unless already complete), finalize: the whole job without Prefect."""
        preparation = self.prepare(overwrite=overwrite)
        execution = None if preparation.already_complete else self.execute(on_progress)
        return self.finalize(execution=execution)

    # -- helpers ---------------------------------------------------------------------------
    def job(self) -> dict[str, Any]:
        """The job record `prepare` wrote."""
        job = self.log.read_job()
        if job is None:
            raise RuntimeError(f"no {self.kind} run at {self.config.output}: call prepare() first")
        return job

    def timings(self, job: dict[str, Any], attempts: list[dict[str, Any]], execution: Execution | None) -> Timings:
        """Start (the job record's), now, and the seconds the attempts ran (summed)."""
        return Timings(
            started_at=job["created_at"],
            finished_at=time.time(),
            wall_s=round(attempt_seconds(attempts), 3),
            first_result_s=execution.first_result_s if execution else None,
        )

    def completed_manifest(self) -> Manifest | None:
        if not self.manifest_file.exists():
            return None
        return Manifest.model_validate(self.manifest_file.read_json())

    def clear(self) -> None:
        """Remove the outputs, the manifest and the run log (start over)."""
        for location in (*self.output_files(), self.manifest_file):
            location.remove()
        self.log.clear()


def attempt_seconds(attempts: list[dict[str, Any]]) -> float:
    """Seconds the attempts ran, summed (never 0, so rates stay finite)."""
    return max(sum(a["seconds"] for a in attempts), 1e-6)


# A small input is cut into at least this many blocks, so that every engine has work from the start
# and results stream out as blocks finish.
MIN_BLOCKS = 16


def rows_per_block(batch_size: int, commit_every_rows: int, rows_to_run: int | None) -> int:
    """Rows per block. The worker that holds a block commits it (in parts of `commit_every_rows`)
    and reports it in one summary, and each block costs a task and a summary whatever its size:
    with 64-row blocks a 1-token batch on two CPU engines ran at 0.58x raw Ray Data LLM's rate,
    with 512-row blocks at 0.95x (bench/scale_bench.py, 30,000 rows). So a large input goes in
    blocks of `commit_every_rows`; a small one in smaller blocks, `MIN_BLOCKS` of them, so every
    engine has work at once and results stream; never under two engine batches."""
    smallest = max(8, 2 * batch_size)
    spread = -(-rows_to_run // MIN_BLOCKS) if rows_to_run else commit_every_rows
    return max(smallest, min(spread, commit_every_rows))


class LLMJob(ResumableJob):
    """Base of `BatchJob` and `ChainJob`; `config` has input, output, storage_options,
    commit_every_rows, max_error_rate and `resume_fingerprint()`.

    Workers read the input and commit the finished rows (`jobs.worker_io`); the driver plans the
    shards and counts what the workers committed. Subclasses say how the input is checked
    (`check_input`, `count_rows`), how a shard's lines become rows (`shard_reader`, and `row_key_of`
    for the repeated-id check), what the pipeline is (`pipeline`) and how a finished row is written
    (`finisher`).
    """

    def __init__(self, config: Any, *, api_key: str | None = None):
        super().__init__(config)
        self.api_key = api_key
        self.results_file = self.output.child("results.jsonl")
        self.errors_file = self.output.child("errors.jsonl")
        self._served_engines: dict[str, tuple[Any, bool]] = {}  # Serve app -> (engine, keep_serving)
        self.engines_used: list[Any] = []  # every ServedEngine this job used, for the manifest
        self.engine_traces = EngineTraces()

    # -- what subclasses define ------------------------------------------------------------
    def shard_reader(self, input_format: str) -> Callable[[Shard, int, dict[int, int]], Iterator[InputRow | RowError]]:
        """A picklable callable: (shard, its first row index, repeated rows -> earlier row) -> its rows."""
        raise NotImplementedError

    def row_key_of(self, input_format: str) -> Callable[[str], str | None] | None:
        """A picklable callable giving a line's id for the repeated-id check (None: ids do not repeat)."""
        raise NotImplementedError

    def pipeline(self, dataset: Any, attempt: int):
        """The processed Dataset for the input rows `dataset` (lazy; chains: None when only resumed
        rows run)."""
        raise NotImplementedError

    def resumed_rows(self) -> set[int]:
        """Chains: rows that join the pipeline at a later step (not read again from the input)."""
        return set()

    def finisher(self, input_format: str) -> Callable[[dict[str, Any]], Finished]:
        raise NotImplementedError

    def engine_batch_size(self) -> int:
        """Rows per engine call (the smallest, for a chain)."""
        raise NotImplementedError

    def block_rows(self, rows_to_run: int | None = None) -> int:
        """Rows per block for a run of `rows_to_run` rows (see `rows_per_block`)."""
        return rows_per_block(self.engine_batch_size(), self.config.commit_every_rows, rows_to_run)

    def shard_bytes(self) -> int:
        """The input's shard size: each shard is read by one worker task."""
        return SHARD_BYTES

    def manifest_fields(self) -> dict[str, Any]:
        raise NotImplementedError

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

    # -- the lifecycle's hooks ---------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        identity = Location(self.config.input, self.config.storage_options).identity()
        return {**self.config.resume_fingerprint(), "input_identity": identity}

    def output_files(self) -> list[Location]:
        return [self.results_file, self.errors_file]

    def release(self) -> None:
        self.release_engines()

    def engine_report(self) -> dict[str, Any] | None:
        steps = getattr(self.config, "steps", None)
        return self.engine_traces.report({s.name: s.model for s in steps} if steps else {"batch": self.config.model})

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        done = self.log.done_mask(job["total_rows"])
        return Work(total=job["total_rows"], done=int(done.sum()), rows=self._committed_blocks(job, done, attempt))

    def _committed_blocks(self, job: dict[str, Any], done: Any, attempt: int) -> Iterator[Committed]:
        """The rows not yet done, read, run and committed by workers; one summary per block."""
        started_at = time.time()
        total = job["total_rows"]
        resumed = self.resumed_rows()
        for index in resumed:
            done[index] = True
        dataset, runnable = None, False
        if not done.all():
            source = Location(self.config.input, self.config.storage_options)
            check_nodes_see(source, self.log.job_file)
            plan = plan_reading(source, self.row_key_of(job["input_format"]), self.shard_bytes())
            if plan.total is not None and plan.total != total:
                raise RuntimeError(f"{self.config.input} has {plan.total} rows now, {total} when the job started; it changed")
            reader = self.shard_reader(job["input_format"])
            logger.info("reading %s in %d shard(s) on the workers", self.config.input, len(plan.shards))
            dataset = read_dataset(plan, reader, done, self.block_rows(len(done) - int(done.sum())))
            runnable = any_runnable(plan, reader, done)
        if dataset is None and not resumed:
            return
        # Only input errors left: they are committed without starting any engine.
        processed = self.pipeline(dataset, attempt) if runnable or resumed else dataset
        finish = self.finisher(job["input_format"])
        blocks = commit_blocks(processed, self.log.parts, attempt, finish, self.config.commit_every_rows, started_at)
        for summary in blocks.iter_rows():
            committed = committed_of(summary)
            self.engine_traces.absorb(committed.traces)
            yield committed

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        """Merge the parts into results.jsonl and errors.jsonl; the manifest with counts and throughput."""
        # In a Ray task: the results do not pass through the flow process (over Ray Client they would
        # cross the network twice).
        stats, attempts = run_on_a_worker(RunLog.merge, self.log, self.results_file, self.errors_file)
        total = job["total_rows"]
        accounted = stats.results + stats.errors
        if accounted != total:
            raise RuntimeError(
                f"{total - accounted} of {total} input rows are neither in results nor in errors; "
                "run execute again to finish them"
            )
        return Manifest(
            status="completed",
            job=self.kind,
            input={"url": self.config.input, "format": job["input_format"], **job["fingerprint"]["input_identity"]},
            outputs={
                "results": self.results_file.url,
                "errors": self.errors_file.url,
                "manifest": self.manifest_file.url,
            },
            counts=build_counts(stats, total),
            timings=self.timings(job, attempts, execution),
            throughput=build_throughput(stats, attempt_seconds(attempts)),
            attempts=attempts,
            flow_run_id=flow_run_id,
            max_error_rate=self.config.max_error_rate,
            steps=self.step_summaries(stats),
            engines=self.log.read_engines(),
            engine=execution.engine if execution else None,
            **self.manifest_fields(),
        )


@dataclass
class RowFinisher:
    """A finished pipeline row -> the line the run log commits (picklable: workers run it).

    `per_step`: chains, whose rows carry usage per step and fail in a named step.
    """

    formatter: Any
    per_step: bool = False

    def __call__(self, row: dict[str, Any]) -> Finished:
        index = int(row["row_index"])
        problem = input_error_of(row)
        if problem is not None:
            return Finished(index, self.formatter.input_error(problem), error_code=problem.code)
        usage = json.loads(row.get("usage_json") or "{}") if self.per_step else None
        failure = failure_of(row)
        if failure is not None:
            line, code = self.formatter.engine_error(row, failure)
            return Finished(index, line, code, failure.step if self.per_step else None, step_usage=usage)
        if usage is not None:
            latencies = [u["latency_s"] for u in usage.values() if u.get("latency_s") is not None]
            tokens_in = sum(u["in"] for u in usage.values())
            tokens_out = sum(u["out"] for u in usage.values())
            latency = sum(latencies) if latencies else None
        else:
            tokens_in, tokens_out, latency = row["num_input_tokens"], row["num_generated_tokens"], row.get("latency_s")
        return Finished(
            index,
            self.formatter.result(row),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            latency_s=latency,
            step_usage=usage,
        )


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    parts = []
    for key in changed:
        if key == "input_identity":
            parts.append("the input file changed")
        else:
            parts.append(f"{key}: {json.dumps(old.get(key), default=str)} -> {json.dumps(new.get(key), default=str)}")
    return "; ".join(parts)
