"""Where a curation run's records live (rayllm_stages.curation.run, curation.log_records): workers
commit them as run-log parts, the driver learns which images have one from a Ray task, and finalize
(rules, dedup, outputs) runs in one Ray task with the same outputs as in this process.

Records here are made without a model (the fetch and decode stages over the test corpus), except in
the slow test, which runs a whole curation with the tiny VLM.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.curation.log_records import finish_record, read_records
from prefect_rayllm.rayllm_stages.curation.records import as_record
from prefect_rayllm.rayllm_stages.curation.run import CurationJob
from prefect_rayllm.rayllm_stages.curation.stages import decode_stage, fetch_stage, stream_rows
from prefect_rayllm.rayllm_stages.jobs.worker_io import commit_blocks, committed_of
from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus

# A part a worker commits is named after its block (`jobs.worker_io`); the driver's writer names none.
WORKER_PART = re.compile(r"part-(\d{4})-[0-9a-f]{16}-\d{6}\.part")
FILTER = {"min_width": 32, "min_height": 32, "phash_max_distance": 6}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(str(tmp_path_factory.mktemp("corpus")))


def config_for(corpus, output: Path, **fields) -> CurationConfig:
    return CurationConfig.model_validate(
        {"source": {"manifest": corpus.manifest_url}, "output": str(output), "model": {"source": "m"}, **fields}
    )


def records_without_a_model(job: CurationJob) -> list[dict]:
    """The listed images' records after fetch and decode, in this process (no caption)."""
    position = {uri: i for i, uri in enumerate(job.uris())}
    decoded = decode_stage(fetch_stage(job.uris(), {"max_attempts": 2}), {"max_edge": 64})
    return [{**as_record(row), "row_index": position[row["uri"]]} for row in decoded]


def commit_on_workers(job: CurationJob, records: list[dict], attempt: int = 1) -> int:
    """Commit `records` as the run does: each block by the worker that holds it; the rows committed."""
    import ray

    dataset = ray.data.from_items(records, override_num_blocks=4)
    blocks = commit_blocks(dataset, job.log.parts, attempt, finish_record, job.config.commit_every_rows, time.time())
    return sum(committed_of(summary).rows for summary in stream_rows(blocks))


def parts_of(output: Path) -> list[str]:
    return sorted(p.name for p in (output / "_rayllm" / "parts").glob("*.part"))


def test_workers_commit_records_that_a_rerun_finds_by_uri(tmp_path, ray_session, corpus):
    """Blocks of records committed by workers are parts of the run log; prepare counts the images
    that have one (read on a worker), and a second commit of a URI does not replace the first."""
    output = tmp_path / "out"
    job = CurationJob(config_for(corpus, output, commit_every_rows=3))
    assert job.prepare().done_rows == 0
    records = records_without_a_model(job)
    assert commit_on_workers(job, records[:10]) == 10
    assert parts_of(output) and all(WORKER_PART.fullmatch(name) for name in parts_of(output)), parts_of(output)

    preparation = CurationJob(job.config).prepare()
    assert (preparation.total_rows, preparation.done_rows, preparation.resumed) == (16, 10, True)
    assert CurationJob(job.config).recorded().tolist() == [i < 10 for i in range(16)]

    changed = {**records[0], "caption": "committed again"}
    assert commit_on_workers(job, [changed], attempt=2) == 1
    assert read_records(job.log)[records[0]["uri"]]["caption"] == records[0]["caption"]  # first commit wins


def _finalize_tasks_on_workers() -> int:
    """Finalize tasks that Ray's timeline shows ran on a worker process."""
    import ray

    events = ray.timeline()
    return sum(1 for e in events if e.get("name", "").endswith("run._finalize_here") and e.get("tid", "").startswith("worker:"))


def test_finalize_runs_on_a_worker_with_the_outputs_of_this_process(tmp_path, ray_session, corpus):
    """The same run log finalized in a Ray task and in this process: the same curated and rejected
    datasets and the same counts and curation section."""
    on_ray, here = tmp_path / "on-ray", tmp_path / "here"
    config = config_for(corpus, on_ray, filter=FILTER, contact_sheet_images=6, commit_every_rows=4)
    job = CurationJob(config)
    job.prepare()
    assert commit_on_workers(job, records_without_a_model(job)) == 16
    shutil.copytree(on_ray, here)

    before = _finalize_tasks_on_workers()
    remote = CurationJob(config).finalize()
    deadline = time.time() + 30  # a worker reports its task events about every second
    while _finalize_tasks_on_workers() == before and time.time() < deadline:
        time.sleep(0.5)
    assert _finalize_tasks_on_workers() > before, "finalize did not run in a Ray task"

    local_job = CurationJob(config.model_copy(update={"output": str(here)}))
    local = local_job.finalize_here(local_job.job(), None, None)

    assert (remote.counts.total, remote.counts.completed, remote.counts.failed) == (16, 8, 8)
    assert remote.counts == local.counts and remote.attempts == local.attempts
    assert remote.curation is not None and local.curation is not None
    assert remote.curation.model_dump() == local.curation.model_dump()
    assert remote.outputs["curated"].startswith(str(on_ray)) and (on_ray / "manifest.json").exists()
    for name in ("curated.parquet", "rejected.parquet"):
        assert pq.read_table(on_ray / name).to_pylist() == pq.read_table(here / name).to_pylist(), name
    assert (on_ray / "contact_sheet.png").read_bytes() == (here / "contact_sheet.png").read_bytes()

    # An image without a record: refused, on the worker as in this process, before anything is written.
    (here / "curated.parquet").unlink()
    partial = CurationJob(config.model_copy(update={"output": str(here)}))
    for part in sorted((here / "_rayllm" / "parts").glob("*.part"))[:1]:
        part.unlink()
    with pytest.raises(RuntimeError, match="have no record yet"):
        partial.finalize()
    assert not (here / "curated.parquet").exists()


@pytest.mark.slow
def test_a_run_commits_its_records_on_workers(tmp_path, ray_session, corpus, tiny_vlm):
    """A whole curation with the tiny VLM: every part is a block committed by a worker (none by the
    driver's writer), progress reaches the total, and the outputs hold every listed image once."""
    output = tmp_path / "out"
    model = {"source": str(tiny_vlm), "engine_kwargs": {"max_model_len": 512, "dtype": "float32"}, "batch_size": 4}
    config = config_for(corpus, output, model=model, filter=FILTER, commit_every_rows=4, contact_sheet_images=0)
    job = CurationJob(config)
    job.prepare()
    seen: list[tuple[int, int]] = []
    execution = job.execute(on_progress=lambda done, total: seen.append((done, total)))
    assert (execution.rows, execution.results + execution.errors) == (16, 16)
    assert execution.first_result_s is not None and 0 < execution.first_result_s <= execution.seconds
    assert seen[0] == (0, 16) and seen[-1] == (16, 16)

    names = parts_of(output)
    assert names and all(WORKER_PART.fullmatch(name) for name in names), names
    assert {WORKER_PART.fullmatch(name).group(1) for name in names} == {f"{execution.attempt:04d}"}  # type: ignore[union-attr]

    manifest = job.finalize(execution=execution)
    assert manifest.counts.total == 16 and manifest.curation is not None and manifest.curation.computed_now == 16
    uris = [r["uri"] for r in pq.read_table(output / "curated.parquet").to_pylist()]
    uris += [r["uri"] for r in pq.read_table(output / "rejected.parquet").to_pylist()]
    assert sorted(uris) == sorted(job.uris())
