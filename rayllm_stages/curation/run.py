"""One curation run, resumable and incremental: `CurationRun` (prepare, execute, finalize, or `run`).

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

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog

ProgressCallback = Callable[[int, int], None]


@dataclass
class CurationPreparation:
    """What `prepare` found: images listed, and how many already have a record."""

    total: int
    done: int
    resumed: bool


@dataclass
class CurationExecution:
    """What one `execute` call did."""

    attempt: int
    images: int
    rejected: int
    seconds: float


class CurationRun:
    """One curation output location: `prepare`, `execute`, `finalize` (or `run` for all three).

    All state lives in the output folder (`_rayllm/`), so each step can run again after a crash.
    Records are kept by URI: a rerun computes only the listed images without a record (after a
    crash: the rest of the run; on a grown prefix, e.g. nightly: the new images), then rules,
    dedup and outputs cover exactly the images listed now.
    """

    def __init__(self, config: CurationConfig):
        self.config = config
        self.output = Location(config.output, config.storage_options)
        self.log = RunLog(self.output)
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

    def prepare(self, overwrite: bool = False) -> CurationPreparation:
        """List the images; start, resume, or refuse when the output holds a run with other settings.

        Raises:
            ResumeRefused: the output's records were made with other settings and not `overwrite`.
        """
        from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused, describe_changes

        fingerprint = self.config.resume_fingerprint()
        job = self.log.read_job()
        if job is not None and job["fingerprint"] != fingerprint and not overwrite:
            raise ResumeRefused(
                f"output {self.config.output} holds curation records made with other settings "
                f"({describe_changes(job['fingerprint'], fingerprint)}); rerun with overwrite (--overwrite) "
                "to start over, or choose another output"
            )
        if overwrite or job is None:
            for name in ("curated.parquet", "rejected.parquet", "manifest.json", CONTACT_SHEET):
                self.output.child(name).remove()
            self.log.clear()
            self.log.write_job({"kind": "curation", "fingerprint": fingerprint, "created_at": time.time()})
        done = len(self.records().keys() & set(self.uris()))
        return CurationPreparation(total=len(self.uris()), done=done, resumed=done > 0)

    def pipeline(self, todo: Sequence[tuple[int, str]]):
        """The lazy Dataset of records for (row_index, uri) pairs: fetch -> decode -> caption."""
        config = self.config
        batch = fetch_batch_size(len(todo), config.fetch_workers, config.fetch.max_concurrency)
        dataset = image_dataset(todo, block_rows=batch)
        dataset = fetch_stage(dataset, config.fetch, config.fetch_workers, batch_size=batch)
        dataset = decode_stage(dataset, config.decode, config.decode_workers)
        return caption_stage(dataset, config.model, config.prompt, config.json_schema, config.sampling)

    def execute(self, on_progress: ProgressCallback | None = None) -> CurationExecution:
        """Run every listed image without a record; commit records in parts as they arrive."""
        job = self._job()
        if job["fingerprint"] != self.config.resume_fingerprint():
            from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused

            raise ResumeRefused(f"the settings changed since {self.config.output} was prepared; prepare again")
        started = time.time()
        uris = self.uris()
        done = self.records().keys()
        todo = [(i, uri) for i, uri in enumerate(uris) if uri not in done]
        attempt = self.log.next_attempt()
        writer = self.log.writer(attempt, self.config.commit_every_rows)
        finished, rejected = len(uris) - len(todo), 0
        if on_progress:
            on_progress(finished, len(uris))
        try:
            for row in stream_rows(self.pipeline(todo)) if todo else []:
                record = as_record(row)
                line = json.dumps(record, ensure_ascii=False)
                if record["stage"]:
                    writer.add_error(record["row_index"], line, record["stage"], record["stage"])
                    rejected += 1
                else:
                    writer.add_result(record["row_index"], line, record["tokens_in"], record["tokens_out"], None)
                finished += 1
                if on_progress and (finished % 16 == 0 or finished == len(uris)):
                    on_progress(finished, len(uris))
        finally:
            writer.commit()
        if on_progress:
            on_progress(finished, len(uris))
        return CurationExecution(attempt=attempt, images=len(todo), rejected=rejected, seconds=round(time.time() - started, 3))

    def records(self) -> dict[str, dict[str, Any]]:
        """Every committed record by URI, first commit wins (a part cut short by a crash is discarded)."""
        records: dict[str, dict[str, Any]] = {}
        for part, _ in self.log.complete_parts():
            for raw in part.iter_lines():
                if raw.startswith("#"):
                    continue
                record = json.loads(raw.rstrip("\n").split("\t", 1)[1])
                records.setdefault(record["uri"], record)
        return records

    def attempts(self) -> list[dict[str, Any]]:
        """Per attempt: images committed and seconds from its start to its last commit."""
        spans: dict[int, list[float]] = {}
        rows: Counter = Counter()
        for _, stats in self.log.complete_parts():
            rows[stats.attempt] += len(stats.indexes)
            if stats.attempt_started_at is not None and stats.last_written_at is not None:
                span = spans.setdefault(stats.attempt, [stats.attempt_started_at, stats.last_written_at])
                span[0], span[1] = min(span[0], stats.attempt_started_at), max(span[1], stats.last_written_at)
        return [
            {"attempt": a, "images": rows[a], "seconds": round(spans[a][1] - spans[a][0], 3) if a in spans else 0.0}
            for a in sorted(rows)
        ]

    def finalize(self, execution: CurationExecution | None = None) -> dict[str, Any]:
        """Rules and dedup over the records of the listed images, then the outputs and the manifest.

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
        attempts = self.attempts()
        seconds = execution.seconds if execution else sum(a["seconds"] for a in attempts)
        processed = execution.images if execution else len(uris)
        extra = {
            "seconds": round(seconds, 3),
            "images_per_s": round(processed / seconds, 3) if seconds > 0 and processed else None,
            "computed_now": processed,
            "reused_records": len(uris) - processed,
            "repeated_uris_in_source": self.repeated_uris,
            "attempts": attempts,
            "model": {"name": self.config.model.served_name, "source": self.config.model.source},
            "filter": self.config.filter.model_dump(),
        }
        return write_outputs(
            marked,
            self.output,
            model_name=self.config.model.served_name,
            fetch=self.config.fetch,
            contact_sheet_images=self.config.contact_sheet_images,
            expected=len(uris),
            extra=extra,
        )

    def run(self, overwrite: bool = False, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """prepare, execute, finalize: the whole run without Prefect."""
        self.prepare(overwrite=overwrite)
        return self.finalize(self.execute(on_progress))

    def _job(self) -> dict[str, Any]:
        job = self.log.read_job()
        if job is None:
            raise RuntimeError(f"no curation run at {self.config.output}: call prepare() first")
        return job
