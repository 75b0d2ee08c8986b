"""One curation run, resumable and incremental: `CurationJob` (prepare, execute, finalize, or `run`),
on the lifecycle that batch and chain jobs share (`jobs.lifecycle`).

    driver:  list the URIs -> which have a record (`log_records.recorded_mask`, a Ray task) -> the rest
    workers: fetch -> decode -> caption (one lazy Ray Data pipeline, `stages`)
             -> the worker that holds a finished block commits its records as run-log parts
                (`jobs.worker_io.commit_blocks`); one `Committed` summary per block to the driver
    finalize (one Ray task): the records of the listed images -> rules and dedup -> `writer` outputs;
             only the `Manifest` comes back

The driver holds the URI listing, a byte per listed image and the block summaries: never the records,
whatever the number of images. Without Ray up (finalize from a plain process), the same functions
run in this process.

Resume: records are committed in parts under `<output>/_rayllm/parts/` as blocks finish (the run
log of `prefect_rayllm.rayllm_stages.jobs.run_log`, as batch jobs use), keyed by URI, first commit
wins; a crash loses at most the blocks in flight. A rerun on the same output computes only the
listed images without a record (after a crash, the rest; on a prefix that grew since, the new
images), then applies rules and dedup to the records of every listed image, so changing only the
`filter` settings re-filters without calling the model. A change of model, prompt, schema, sampling
or decode settings is refused unless `overwrite`. An object rewritten under the same key keeps its
old record: `overwrite` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.curation.log_records import finish_record, read_records, recorded_mask
from prefect_rayllm.rayllm_stages.curation.source import iter_image_uris
from prefect_rayllm.rayllm_stages.curation.stages import (
    apply_rules,
    caption_stage,
    decode_stage,
    drop_duplicates,
    fetch_batch_size,
    fetch_stage,
    image_dataset,
    stream_rows,
)
from prefect_rayllm.rayllm_stages.curation.writer import CONTACT_SHEET, write_outputs
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Execution, Preparation, ResumableJob, ResumeRefused, Work
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.rayllm_stages.jobs.worker_io import Committed, commit_blocks, committed_of, run_on_a_worker

PROMPT_FIELDS = ("prompt", "json_schema")


class CurationJob(ResumableJob):
    """One curation output location, on the shared job lifecycle: `prepare`, `execute`, `finalize`
    (or `run` for all three); see `jobs.lifecycle.ResumableJob`.

    What is curation's own: rows are images keyed by URI, listed from the source each time (the
    job is `incremental`); `work` runs fetch -> decode -> caption over the listed images without a
    record, and the worker holding each finished block commits its records (a rejected image is an
    error row, its stage the code) and yields a `Committed` summary; `write_outputs` applies the
    rules and dedup to the records of every listed image and writes the datasets, the contact sheet
    and the manifest (`Manifest.curation`), in one Ray task (`finalize_here` is its body).
    """

    kind = "curation"
    incremental = True
    config: CurationConfig

    def __init__(self, config: CurationConfig):
        super().__init__(config)
        self._uris: list[str] | None = None
        self.repeated_uris = 0

    def uris(self) -> list[str]:
        """The source's URIs in order, each once (a manifest may list one twice: it is one image)."""
        if self._uris is None:
            seen: dict[str, None] = {}
            listed = 0
            for uri in iter_image_uris(self.config.source):
                listed += 1
                seen.setdefault(uri, None)
            self._uris = list(seen)
            self.repeated_uris = listed - len(self._uris)
        return self._uris

    # -- the lifecycle's hooks ---------------------------------------------------------------
    def check_input(self) -> str:
        """List the images (a missing prefix or manifest fails here, named); the source's kind."""
        self.uris()
        return "manifest" if self.config.source.manifest else "prefix"

    def count_rows(self, input_format: str) -> int:
        return len(self.uris())

    def done_rows(self, job: dict[str, Any]) -> int:
        return int(self.recorded().sum())

    def output_files(self) -> list[Location]:
        return [self.output.child(name) for name in ("curated.parquet", "rejected.parquet", CONTACT_SHEET)]

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        uris = self.uris()
        recorded = self.recorded()
        todo = [(i, uri) for i, uri in enumerate(uris) if not recorded[i]]
        return Work(total=len(uris), done=len(uris) - len(todo), rows=self._committed_blocks(todo, attempt))

    def _committed_blocks(self, todo: Sequence[tuple[int, str]], attempt: int) -> Iterator[Committed]:
        """The images of `todo` through the pipeline; workers commit each finished block of records."""
        if not todo:
            return
        started_at = time.time()
        pipeline = self.pipeline(todo)
        blocks = commit_blocks(pipeline, self.log.parts, attempt, finish_record, self.config.commit_every_rows, started_at)
        for summary in stream_rows(blocks):  # no prefetch: progress moves as each block is committed
            yield committed_of(summary)

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        """`finalize_here` in one Ray task when Ray is up (the records never reach this process); here otherwise.

        Raises:
            RuntimeError: a listed image has no record (execute has not finished); nothing is written.
        """
        self.uris()  # listed here, once: the task gets the listing with the job
        return run_on_a_worker(_finalize_here, self, job, execution, flow_run_id)

    def finalize_here(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        """Rules and dedup over the records of the listed images, then the outputs, in this process.

        Raises:
            RuntimeError: a listed image has no record (execute has not finished); nothing is written.
        """
        uris = self.uris()
        stored = read_records(self.log, only=set(uris))
        missing = [uri for uri in uris if uri not in stored]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(uris)} images have no record yet (e.g. {missing[0]}); run execute again")
        records = [{**stored.pop(uri), "row_index": index} for index, uri in enumerate(uris)]
        marked = drop_duplicates(apply_rules(records, self.config.filter), self.config.filter)
        attempts = self.log.attempts()
        computed_now = execution.rows if execution else 0
        config = self.config
        source = config.source
        return write_outputs(
            marked,
            self.output,
            model_name=config.model.served_name,
            fetch=config.fetch,
            contact_sheet_images=config.contact_sheet_images,
            expected=len(uris),
            write_manifest=False,
            run_fields={
                "input": {"url": source.manifest or source.url, "format": job.get("input_format"), "images": len(uris)},
                "model": {"name": config.model.served_name, "source": config.model.source, "engine": config.model.engine},
                "sampling": config.sampling.model_dump(),
                "prompt_template_hash": prompt_digest(config),
                "timings": self.timings(job, attempts, execution),
                "attempts": attempts,
                "flow_run_id": flow_run_id,
            },
            section_fields={
                "computed_now": computed_now,
                "reused_records": len(uris) - computed_now,
                "repeated_uris_in_source": self.repeated_uris,
                "filter": config.filter.model_dump(),
            },
        )

    # -- curation's own ----------------------------------------------------------------------
    def pipeline(self, todo: Sequence[tuple[int, str]]):
        """The lazy Dataset of records for (row_index, uri) pairs: fetch -> decode -> caption."""
        config = self.config
        batch = fetch_batch_size(len(todo), config.fetch_workers, config.fetch.max_concurrency)
        dataset = image_dataset(todo, block_rows=batch)
        dataset = fetch_stage(dataset, config.fetch, config.fetch_workers, batch_size=batch)
        dataset = decode_stage(dataset, config.decode, config.decode_workers)
        return caption_stage(dataset, config.model, config.prompt, config.json_schema, config.sampling)

    def recorded(self) -> np.ndarray:
        """One bool per listed image: True where the run log holds its record. Read in one Ray task
        when Ray is up, so only the mask (a byte per image) reaches this process."""
        return run_on_a_worker(recorded_mask, self.log, self.uris())


def _finalize_here(job: CurationJob, record: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
    return job.finalize_here(record, execution, flow_run_id)


def prompt_digest(config: CurationConfig) -> str:
    """A short hash of what the model is asked (the prompt and the reply's schema)."""
    asked = {name: getattr(config, name) for name in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["CurationJob", "Execution", "Preparation", "ResumeRefused"]
