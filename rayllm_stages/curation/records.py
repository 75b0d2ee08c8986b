"""Curation records: one image's row after the caption stage, the unit that the run log, the rules,
dedup, the funnel and the writer work on.

    uri, row_index, width, height, norm_width, norm_height, format, frames, byte_size, sha256,
    phash, fetch_attempts, caption, scores (JSON text), tokens_in, tokens_out, stage, reason

`stage` and `reason` are "" while the image is still in; once it is rejected they say where
(`fetch`, `decode`, `caption`, `filter`, `dedup`) and why, and later stages pass it through
untouched. Every input URI ends in exactly one of the curated and rejected datasets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

STAGES = ("fetch", "decode", "caption", "filter", "dedup")
METADATA = ("width", "height", "norm_width", "norm_height", "format", "frames", "byte_size", "sha256", "phash", "fetch_attempts")
INT_FIELDS = (
    "row_index",
    "width",
    "height",
    "norm_width",
    "norm_height",
    "frames",
    "byte_size",
    "fetch_attempts",
    "tokens_in",
    "tokens_out",
)
STR_FIELDS = ("uri", "format", "sha256", "phash", "caption", "scores", "stage", "reason")
RECORD_FIELDS = ("uri", "row_index", *METADATA, "caption", "scores", "tokens_in", "tokens_out", "stage", "reason")


def plain_value(value: Any) -> Any:
    """A numpy scalar or array (as Ray hands rows over) as a plain Python value."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def empty_record(uri: str, row_index: int = -1) -> dict[str, Any]:
    record: dict[str, Any] = {name: 0 for name in INT_FIELDS}
    record.update({name: "" for name in STR_FIELDS})
    record.update(uri=uri, row_index=row_index)
    return record


def as_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record from a row: a record, or a fetched/decoded row (its fetch or decode error becomes
    the record's stage and reason, so the rules, dedup and writer also work without the VLM)."""
    record = empty_record(str(row["uri"]))
    record.update({k: plain_value(v) for k, v in row.items() if k in RECORD_FIELDS})
    for name in INT_FIELDS:
        record[name] = int(record[name] or 0)
    for name in STR_FIELDS:
        record[name] = "" if record[name] is None else str(record[name])
    if not record["stage"]:
        for stage in ("fetch", "decode"):
            if row.get(f"{stage}_error"):
                record.update(stage=stage, reason=str(row[f"{stage}_error"]))
                break
    return record
