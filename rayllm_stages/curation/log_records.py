"""Curation records in the run log (`jobs.run_log`): how a worker commits a finished record, and how
the committed ones are found again by URI.

A record is committed as one part line, a result when the image is still in, an error (its code
the stage) once it is rejected; the line is the record as JSON. Records are keyed by URI, not by
row index: a source listed again (it grew, or a manifest changed) gives an image another index,
and its record stays its own. The first commit of a URI wins (a crashed attempt's block may be
committed again by the next one).

These run where the records are: `finish_record` in the Ray task that holds a finished block
(`jobs.worker_io.commit_blocks`), `recorded_mask` and `read_records` in one Ray task when Ray is up
(`jobs.worker_io.run_on_a_worker`), so the driver never holds the records.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.curation.records import as_record
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog, part_lines
from prefect_rayllm.rayllm_stages.jobs.worker_io import Finished


def finish_record(row: dict[str, Any]) -> Finished:
    """A pipeline row (a record, or a row rejected on the way) -> the run-log line of its record."""
    record = as_record(row)
    line = json.dumps(record, ensure_ascii=False)
    if record["stage"]:
        return Finished(record["row_index"], line, error_code=record["stage"], failed_step=record["stage"])
    return Finished(record["row_index"], line, tokens_in=record["tokens_in"], tokens_out=record["tokens_out"])


def recorded_mask(log: RunLog, uris: Sequence[str]) -> np.ndarray:
    """One bool per URI of `uris`: True where a whole part holds its record. Reads the parts line by
    line and keeps only the mask (a byte per listed image), whatever the run log holds."""
    position = {uri: i for i, uri in enumerate(uris)}
    mask = np.zeros(len(uris), dtype=bool)
    for part, _ in log.complete_parts():
        for _, line in part_lines(part):
            index = position.get(json.loads(line)["uri"])
            if index is not None:
                mask[index] = True
    return mask


def read_records(log: RunLog, only: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
    """The committed records by URI, first commit wins (a part cut short by a crash is discarded);
    `only`: just these URIs."""
    records: dict[str, dict[str, Any]] = {}
    for part, _ in log.complete_parts():
        for _, line in part_lines(part):
            record = json.loads(line)
            if only is None or record["uri"] in only:
                records.setdefault(record["uri"], record)
    return records


__all__ = ["finish_record", "read_records", "recorded_mask"]
