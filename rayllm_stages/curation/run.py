"""One curation run, resumable and incremental: `CurationJob` (prepare, execute, finalize, or `run`),
on the lifecycle that batch and chain jobs share (`jobs.lifecycle`).

    URIs (listed lazily) --> fetch -> decode -> caption (one lazy Ray Data pipeline, `stages`)
      --> driver: records committed to the run log as they arrive (resume)
      --> finalize: rules and dedup over the records of the listed images --> `writer` outputs

Resume: records are committed in parts under `<output>/_rayllm/parts/` as they stream in (the run
log of `prefect_rayllm.rayllm_stages.jobs.run_log`, as batch jobs use), keyed by URI. A rerun on the same output
computes only the listed images without a record (after a crash, the rest; on a prefix that grew
since, the new images), then applies rules and dedup to the records of every listed image, so
changing only the `filter` settings re-filters without calling the model. A change of model,
prompt, schema, sampling or decode settings is refused unless `overwrite`. An object rewritten
under the same key keeps its old record: `overwrite` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.curation.records import as_record
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
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Execution, Finished, Preparation, ResumableJob, ResumeRefused, Work
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.rayllm_stages.jobs.run_log import part_lines

PROMPT_FIELDS = ("prompt", "json_schema")


class CurationJob(ResumableJob):
    """One curation output location, on the shared job lifecycle: `prepare`, `execute`, `finalize`
    (or `run` for all three); see `jobs.lifecycle.ResumableJob`.

    What is curation's own: rows are images keyed by URI, listed from the source each time (the
    job is `incremental`); `work` runs fetch -> decode -> caption over the listed images without a
    record and yields each record as it leaves the pipeline (a rejected image is an error row, its
    stage the code); `write_outputs` applies the rules and dedup to the records of every listed
    image and writes the datasets, the contact sheet and the manifest (`Manifest.curation`).
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
        return len(self.records().keys() & set(self.uris()))

    def output_files(self) -> list[Location]:
        return [self.output.child(name) for name in ("curated.parquet", "rejected.parquet", CONTACT_SHEET)]

    def work(self, job: dict[str, Any], attempt: int) -> Work:
        uris = self.uris()
        done = self.records().keys()
        todo = [(i, uri) for i, uri in enumerate(uris) if uri not in done]
        return Work(total=len(uris), done=len(uris) - len(todo), rows=self._finished(todo))

    def _finished(self, todo: Sequence[tuple[int, str]]) -> Iterator[Finished]:
        if not todo:
            return
        for row in stream_rows(self.pipeline(todo)):
            record = as_record(row)
            line = json.dumps(record, ensure_ascii=False)
            if record["stage"]:
                yield Finished(record["row_index"], line, error_code=record["stage"], failed_step=record["stage"])
            else:
                yield Finished(record["row_index"], line, tokens_in=record["tokens_in"], tokens_out=record["tokens_out"])

    def write_outputs(self, job: dict[str, Any], execution: Execution | None, flow_run_id: str | None) -> Manifest:
        """Rules and dedup over the records of the listed images, then the outputs.

        Raises:
            RuntimeError: a listed image has no record (execute has not finished); nothing is written.
        """
        uris = self.uris()
        stored = self.records()
        missing = [uri for uri in uris if uri not in stored]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(uris)} images have no record yet (e.g. {missing[0]}); run execute again")
        records = [{**stored[uri], "row_index": index} for index, uri in enumerate(uris)]
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

    def records(self) -> dict[str, dict[str, Any]]:
        """Every committed record by URI, first commit wins (a part cut short by a crash is discarded)."""
        records: dict[str, dict[str, Any]] = {}
        for part, _ in self.log.complete_parts():
            for _, line in part_lines(part):
                record = json.loads(line)
                records.setdefault(record["uri"], record)
        return records


def prompt_digest(config: CurationConfig) -> str:
    """A short hash of what the model is asked (the prompt and the reply's schema)."""
    asked = {name: getattr(config, name) for name in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["CurationJob", "Execution", "Preparation", "ResumeRefused"]
