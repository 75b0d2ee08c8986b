"""The curation outputs: curated.parquet, rejected.parquet, contact_sheet.png and manifest.json (the
jobs' one `Manifest` type, with the `curation` section)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from prefect_rayllm.rayllm_stages.curation.contact_sheet import contact_sheet
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig
from prefect_rayllm.rayllm_stages.curation.funnel import fetch_summary, funnel, reason_kind
from prefect_rayllm.rayllm_stages.curation.records import as_record
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.manifest import Counts, CurationSection, Manifest, Throughput, percentiles

CONTACT_SHEET = "contact_sheet.png"


def _curated_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("uri", pa.string()),
            ("sha256", pa.string()),
            ("phash", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("norm_width", pa.int64()),
            ("norm_height", pa.int64()),
            ("format", pa.string()),
            ("frames", pa.int64()),
            ("byte_size", pa.int64()),
            ("fetch_attempts", pa.int64()),
            ("caption", pa.string()),
            ("scores", pa.string()),
            ("model", pa.string()),
        ]
    )


def _rejected_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("fetch_attempts", pa.int64())])


def write_outputs(
    records: Sequence[Mapping[str, Any]],
    output: str | Location,
    *,
    storage_options: dict[str, Any] | None = None,
    model_name: str = "",
    fetch: FetchConfig | None = None,
    contact_sheet_images: int = 24,
    expected: int | None = None,
    run_fields: Mapping[str, Any] | None = None,
    section_fields: Mapping[str, Any] | None = None,
    write_manifest: bool = True,
) -> Manifest:
    """Write curated.parquet, rejected.parquet, contact_sheet.png and manifest.json; return the manifest.

    `records` are marked records (after rules and dedup). `expected`: the number of input images;
    when given, the write is refused unless every one of them is curated or rejected. A run
    (`CurationJob`) adds what it knows to the manifest: `run_fields` (timings, attempts, input,
    model, ...: `Manifest` fields) and `section_fields` (`CurationSection` fields), and writes
    manifest.json itself (`write_manifest=False`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = output if isinstance(output, Location) else Location(output, storage_options or {})
    records = [as_record(r) for r in records]
    curated = sorted((r for r in records if not r["stage"]), key=lambda r: r["uri"])
    rejected = sorted((r for r in records if r["stage"]), key=lambda r: r["uri"])
    if expected is not None and len(curated) + len(rejected) != expected:
        raise RuntimeError(f"{expected - len(curated) - len(rejected)} of {expected} images are neither curated nor rejected")
    uris = Counter(r["uri"] for r in records)
    repeated = [u for u, n in uris.items() if n > 1]
    if repeated:
        raise RuntimeError(f"{len(repeated)} images have more than one record, e.g. {repeated[0]}")
    outputs = {
        name: location.child(file)
        for name, file in (("curated", "curated.parquet"), ("rejected", "rejected.parquet"), ("manifest", "manifest.json"))
    }
    curated_table = pa.Table.from_pylist([{**r, "model": model_name} for r in curated], schema=_curated_schema())
    rejected_table = pa.Table.from_pylist(rejected, schema=_rejected_schema())
    for name, table in (("curated", curated_table), ("rejected", rejected_table)):
        with outputs[name].open("wb") as handle:
            pq.write_table(table, handle)
    sheet: dict[str, list[str]] = {}
    if contact_sheet_images and records:
        png, sheet = contact_sheet(records, contact_sheet_images, fetch or FetchConfig())
        outputs["contact_sheet"] = location.child(CONTACT_SHEET)
        outputs["contact_sheet"].write_bytes(png)
    manifest = curation_manifest(
        records,
        {name: loc.url for name, loc in outputs.items()},
        run_fields={"model": {"name": model_name}, **(run_fields or {})},
        section_fields={"contact_sheet": sheet, **(section_fields or {})},
    )
    if write_manifest:
        outputs["manifest"].write_json(manifest.model_dump(mode="json"))
    return manifest


def curation_manifest(
    records: Sequence[Mapping[str, Any]],
    outputs: dict[str, str],
    run_fields: Mapping[str, Any] | None = None,
    section_fields: Mapping[str, Any] | None = None,
) -> Manifest:
    """The manifest of marked records: counts (curated as completed, rejected as failed, by stage),
    tokens, and the curation section (funnel, reasons, fetch retries); a run adds its fields."""
    steps = funnel(records)
    rejected = [r for r in records if r["stage"]]
    by_stage = {s["stage"]: s["rejected"] for s in steps if s["rejected"]}
    total = len(records)
    fields: dict[str, Any] = {
        "input": {"images": total},
        "model": {},
        "timings": {"started_at": time.time(), "finished_at": time.time(), "wall_s": 0.0},
        "attempts": [],
        **(run_fields or {}),
    }
    attempts = fields["attempts"]
    wall = sum(a["seconds"] for a in attempts)
    tokens_in, tokens_out = sum(r["tokens_in"] for r in records), sum(r["tokens_out"] for r in records)
    return Manifest(
        status="completed",
        job="curation",
        outputs=outputs,
        counts=Counts(
            total=total,
            completed=total - len(rejected),
            failed=len(rejected),
            error_rate=round(len(rejected) / total, 6) if total else 0.0,
            errors_by_code=dict(sorted(by_stage.items())),
        ),
        throughput=Throughput(
            rows_per_s=round(sum(a["rows"] for a in attempts) / wall, 3) if wall > 0 else 0.0,
            output_tokens_per_s=round(tokens_out / wall, 3) if wall > 0 else 0.0,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            latency_s=percentiles([]),
        ),
        curation=CurationSection(
            rejected_by_stage=by_stage,
            rejected_by_reason=dict(Counter(reason_kind(r["stage"], r["reason"]) for r in rejected).most_common()),
            funnel=steps,
            fetch=fetch_summary(records),
            **(section_fields or {}),
        ),
        **fields,
    )
