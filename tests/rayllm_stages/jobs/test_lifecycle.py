"""The shared job lifecycle (`ResumableJob`): prepare -> execute -> finalize, the job record, refusal
on changed settings, overwrite, resume after a crash, progress cadence, incremental jobs.

`SquareJob` is a small real job on the lifecycle (no Ray): it reads integers from a JSONL file and
writes their squares; a negative number is an error row. Its one test-only part is the named
injected fault `CrashAfter`, which stops the work after some rows, as a killed worker would.
The batch job's own hooks are exercised on an input of malformed lines, which needs no engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import Field

from prefect_rayllm.rayllm_stages.config.base import OutputJobConfig
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob
from prefect_rayllm.rayllm_stages.jobs.lifecycle import (
    Execution,
    Finished,
    Progress,
    ResumableJob,
    ResumeRefused,
    Work,
    attempt_seconds,
    describe_changes,
)
from prefect_rayllm.rayllm_stages.jobs.manifest import Counts, Manifest, Throughput, build_counts, percentiles


class SquareConfig(OutputJobConfig):
    input: str
    power: int = Field(2, description="a setting results depend on")
    label: str = Field("", description="a setting they do not")

    def resume_fingerprint(self) -> dict[str, Any]:
        return {"input": self.input, "power": self.power}


class CrashAfter(RuntimeError):
    """Injected fault: the work stops after `rows` rows, as if its worker were killed."""


class SquareJob(ResumableJob):
    kind = "batch"

    def __init__(self, config: SquareConfig, crash_after: int | None = None):
        super().__init__(config)
        self.crash_after = crash_after
        self.computed: list[int] = []  # row indexes this job object computed
        self.released = 0

    def numbers(self) -> list[int]:
        return [json.loads(line) for line in Location(self.config.input).read_text().splitlines()]

    def check_input(self) -> str:
        self.numbers()
        return "jsonl"

    def count_rows(self, input_format: str) -> int:
        return len(self.numbers())

    def output_files(self) -> list[Location]:
        return [self.output.child("results.jsonl"), self.output.child("errors.jsonl")]

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        done = self.log.done_indexes()
        return Work(total=job["total_rows"], done=len(done), rows=self._rows(done))

    def _rows(self, done: set[int]) -> Iterator[Finished]:
        for index, number in enumerate(self.numbers()):
            if index in done:
                continue
            if self.crash_after is not None and len(self.computed) == self.crash_after:
                raise CrashAfter(f"injected fault after {self.crash_after} rows")
            self.computed.append(index)
            if number < 0:
                yield Finished(index, json.dumps({"index": index, "error": "negative"}), error_code="negative")
            else:
                yield Finished(index, json.dumps({"index": index, "value": number**self.config.power}), tokens_in=1, tokens_out=2)

    def release(self) -> None:
        self.released += 1

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        results, errors = self.output_files()
        stats, attempts = self.log.merge(results, errors)
        if stats.results + stats.errors != job["total_rows"]:
            raise RuntimeError("rows are missing: run execute again")
        return Manifest(
            status="completed",
            job=self.kind,
            input={"url": self.config.input},
            outputs={"results": results.url, "errors": errors.url, "manifest": self.manifest_file.url},
            model={},
            counts=build_counts(stats, job["total_rows"]),
            timings=self.timings(job, attempts, execution),
            throughput=Throughput(rows_per_s=0, output_tokens_per_s=0, tokens_in=0, tokens_out=0, latency_s=percentiles([])),
            attempts=attempts,
            flow_run_id=flow_run_id,
        )


class ListedJob(SquareJob):
    """Incremental: re-counts its input on every prepare and finalizes again on every run."""

    kind = "curation"
    incremental = True

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        done = self.log.done_indexes()
        return Work(total=len(self.numbers()), done=len(done), rows=self._rows(done))

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        total = len(self.numbers())
        done = self.log.done_indexes()
        if len(done) != total:
            raise RuntimeError("rows are missing: run execute again")
        return Manifest(
            status="completed",
            job=self.kind,
            input={"url": self.config.input, "rows": total},
            outputs={"manifest": self.manifest_file.url},
            model={},
            counts=Counts(total=total, completed=total, failed=0, error_rate=0.0),
            timings=self.timings(job, self.log.attempts(), execution),
            throughput=Throughput(rows_per_s=0, output_tokens_per_s=0, tokens_in=0, tokens_out=0, latency_s=percentiles([])),
            attempts=self.log.attempts(),
        )


def numbers_file(tmp_path, numbers: list[int]) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f"{n}\n" for n in numbers))
    return str(path)


def square_config(tmp_path, numbers: list[int], **fields) -> SquareConfig:
    return SquareConfig(input=numbers_file(tmp_path, numbers), output=str(tmp_path / "out"), **{"commit_every_rows": 4, **fields})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_execute_finalize_accounts_for_every_row(tmp_path):
    config = square_config(tmp_path, [1, 2, -3, 4, 5])
    job = SquareJob(config)
    preparation = job.prepare()
    assert (preparation.total_rows, preparation.done_rows, preparation.resumed, preparation.already_complete) == (
        5,
        0,
        False,
        False,
    )
    record = json.loads((tmp_path / "out" / "_rayllm" / "job.json").read_text())
    assert record["kind"] == "batch" and record["total_rows"] == 5 and record["fingerprint"] == config.resume_fingerprint()

    execution = job.execute()
    assert (execution.attempt, execution.rows, execution.results, execution.errors) == (1, 5, 4, 1)
    assert execution.first_result_s is not None and job.released == 1

    manifest = job.finalize(flow_run_id="run-1", execution=execution)
    assert manifest.counts == Counts(total=5, completed=4, failed=1, error_rate=0.2, errors_by_code={"negative": 1})
    assert [a["rows"] for a in manifest.attempts] == [5] and manifest.flow_run_id == "run-1"
    assert sorted(r["value"] for r in lines(tmp_path / "out" / "results.jsonl")) == [1, 4, 16, 25]
    assert lines(tmp_path / "out" / "errors.jsonl") == [{"index": 2, "error": "negative"}]
    assert Manifest.model_validate_json((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert not (tmp_path / "out" / "_rayllm" / "parts").exists()  # merged, then dropped

    # Done is done: prepare says so, and finalize returns the written manifest unchanged.
    again = SquareJob(config)
    assert again.prepare().already_complete and again.finalize() == manifest
    assert again.run() == manifest and again.computed == []


def test_crash_mid_execute_keeps_committed_parts_and_the_rerun_computes_only_the_rest(tmp_path):
    config = square_config(tmp_path, list(range(10)))
    crashing = SquareJob(config, crash_after=6)
    crashing.prepare()
    with pytest.raises(CrashAfter):
        crashing.execute()
    assert crashing.released == 1  # released even though the work failed
    committed = crashing.log.done_indexes()
    assert committed == set(range(6))  # one whole part of 4, then the rest committed on the way out

    with pytest.raises(RuntimeError, match="missing"):
        SquareJob(config).finalize()  # not everything is committed: nothing is written
    assert not (tmp_path / "out" / "manifest.json").exists()

    rerun = SquareJob(config)
    preparation = rerun.prepare()
    assert preparation.resumed and preparation.done_rows == 6
    assert rerun.execute().attempt == 2
    assert rerun.computed == [6, 7, 8, 9]
    manifest = rerun.finalize()
    assert manifest.counts.completed == 10
    assert [(a["attempt"], a["rows"]) for a in manifest.attempts] == [(1, 6), (2, 4)]
    assert sorted(r["index"] for r in lines(tmp_path / "out" / "results.jsonl")) == list(range(10))


def test_changed_settings_are_refused_naming_each_change_unless_overwrite(tmp_path):
    config = square_config(tmp_path, [1, 2, 3])
    SquareJob(config).run()
    assert SquareJob(config.model_copy(update={"label": "other"})).prepare().already_complete  # not in the fingerprint

    cubed = config.model_copy(update={"power": 3})
    with pytest.raises(ResumeRefused, match=r"holds a batch run with other settings \(power: 2 -> 3\).*--overwrite"):
        SquareJob(cubed).prepare()
    assert (tmp_path / "out" / "manifest.json").exists()  # a refusal leaves everything as it was

    started_over = SquareJob(cubed)
    preparation = started_over.prepare(overwrite=True)
    assert (preparation.done_rows, preparation.already_complete) == (0, False)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "results.jsonl").exists()
    started_over.execute()
    assert started_over.finalize().counts.completed == 3
    assert sorted(r["value"] for r in lines(tmp_path / "out" / "results.jsonl")) == [1, 8, 27]


def test_execute_refuses_settings_changed_since_prepare(tmp_path):
    config = square_config(tmp_path, [1, 2])
    SquareJob(config).prepare()
    with pytest.raises(ResumeRefused, match="changed since .* was prepared"):
        SquareJob(config.model_copy(update={"power": 4})).execute()
    with pytest.raises(RuntimeError, match="call prepare"):
        SquareJob(config.model_copy(update={"output": str(tmp_path / "elsewhere")})).execute()


def test_progress_is_reported_at_start_every_sixteen_rows_at_the_total_and_at_the_end(tmp_path):
    config = square_config(tmp_path, list(range(40)), commit_every_rows=100)
    calls: list[tuple[int, int]] = []
    job = SquareJob(config)
    job.prepare()
    job.execute(on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 40), (16, 40), (32, 40), (40, 40), (40, 40)]

    progress = Progress(None, total=3)
    progress.advance()  # no callback: nothing to call, no error
    assert progress.finished == 1


def test_incremental_job_recounts_its_input_finalizes_every_run_and_keeps_its_log(tmp_path):
    config = square_config(tmp_path, [1, 2, 3])
    first = ListedJob(config).run()
    assert first.counts.total == 3 and (tmp_path / "out" / "_rayllm" / "parts").exists()

    # The input grew: the next run computes only the new rows and finalizes over all of them.
    (tmp_path / "in.jsonl").write_text("1\n2\n3\n4\n5\n")
    grown = ListedJob(config)
    preparation = grown.prepare()
    assert (preparation.total_rows, preparation.done_rows, preparation.already_complete) == (5, 3, False)
    manifest = grown.run()
    assert grown.computed == [3, 4] and manifest.counts.total == 5
    assert [a["rows"] for a in manifest.attempts] == [3, 2]

    # Nothing new: still finalized again (never "already complete"), nothing computed.
    unchanged = ListedJob(config)
    assert not unchanged.prepare().already_complete
    assert unchanged.run().counts.total == 5 and unchanged.computed == []


def test_describe_changes_names_each_setting():
    old = {"sampling": {"max_tokens": 8}, "prompt": "a", "input_identity": {"size": 1}}
    new = {"sampling": {"max_tokens": 9}, "prompt": "a", "input_identity": {"size": 2}, "seed": 1}
    assert (
        describe_changes(old, new) == 'the input file changed; sampling: {"max_tokens": 8} -> {"max_tokens": 9}; seed: null -> 1'
    )


def test_attempt_seconds_are_summed_and_never_zero():
    assert attempt_seconds([{"seconds": 1.5}, {"seconds": 2.0}]) == 3.5
    assert attempt_seconds([]) > 0


def test_batch_job_on_the_lifecycle_without_an_engine(tmp_path, ray_session):
    """BatchJob's hooks (input check, count, input errors, merge, manifest): every line malformed,
    so no row reaches an engine (the model does not exist); Ray workers read and commit them."""
    source = tmp_path / "in.jsonl"
    source.write_text('nope\n{"custom_id": "a"}\n[]\n')
    config = BatchJobConfig(input=str(source), output=str(tmp_path / "out"), model={"source": "./unused"}, commit_every_rows=2)
    job = BatchJob(config)
    assert job.prepare().total_rows == 3
    execution = job.execute()
    assert (execution.results, execution.errors) == (0, 3)
    manifest = job.finalize(execution=execution)
    assert manifest.job == "batch" and manifest.counts.failed == 3 and manifest.max_error_rate == config.max_error_rate
    assert manifest.input["url"] == str(source) and manifest.input["format"] == "openai_batch"
    assert manifest.model["name"] == "unused" and manifest.sampling is not None and manifest.curation is None
    assert [json.loads(line)["error"]["line"] for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert (tmp_path / "out" / "results.jsonl").read_text() == ""


def test_check_resume_reads_nothing_of_a_new_output(tmp_path):
    """Before any runtime (the CLI's check): a new output reads no input (it may not exist yet)."""
    config = SquareConfig(input=str(tmp_path / "written-later.jsonl"), output=str(tmp_path / "out"))
    assert SquareJob(config).check_resume() is None
    (tmp_path / "written-later.jsonl").write_text("1\n")
    SquareJob(config).prepare()
    assert SquareJob(config).check_resume()["kind"] == "batch"
    with pytest.raises(ResumeRefused, match=r"\(power: 2 -> 5\)"):
        SquareJob(config.model_copy(update={"power": 5})).check_resume()
    assert SquareJob(config.model_copy(update={"power": 5})).check_resume(overwrite=True) is not None
