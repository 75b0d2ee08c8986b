"""Curation tasks.

The flow's tasks are the shared job lifecycle (`jobs.lifecycle`) of one resumable, streaming
pipeline: `prepare_curation`, `run_curation` (fetch -> decode -> caption in one lazy Ray Data
pipeline, records committed as they arrive), `finalize_curation` (rules, dedup, outputs, contact
sheet, the manifest) and `publish_curation_report`.

The stage tasks are the same stages one at a time, for flows of your own: `fetch_images`,
`decode_images`, `caption_images`, `filter_images`, `dedup_images`, `write_curation`. Each takes
a Ray Dataset or a list of rows. Given a Dataset, fetch, decode, caption and filter add their stage
lazily and return at once (the work runs, streaming, when the Dataset is consumed: chaining them
keeps one pipeline); given a list, they compute now and return a list. Example:

```python
from prefect import flow
from prefect_rayllm.tasks.curation import fetch_images, decode_images, filter_images, dedup_images, write_curation

@flow
def without_a_model(uris: list[str], output: str):
    decoded = decode_images(fetch_images(uris, {"storage_options": {"anon": True}}))
    records = dedup_images(filter_images(decoded, {"min_width": 256}))   # fetch/decode errors stay rejected
    return write_curation(records, output)
```
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams
from prefect_rayllm.rayllm_stages.curation import stages
from prefect_rayllm.rayllm_stages.curation.config import DEFAULT_PROMPT, CurationConfig
from prefect_rayllm.rayllm_stages.curation.contact_sheet import compact_for_markdown
from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig
from prefect_rayllm.rayllm_stages.curation.filters import FilterConfig
from prefect_rayllm.rayllm_stages.curation.run import CurationJob
from prefect_rayllm.rayllm_stages.curation.writer import write_outputs
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Execution, Preparation
from prefect_rayllm.rayllm_stages.jobs.manifest import CurationSection, Manifest
from prefect_rayllm.tasks.batch import EXECUTION_RETRIES, STORAGE_RETRIES
from prefect_rayllm.tasks.blocks import storage_options_with_block, with_storage_credentials
from prefect_rayllm.tasks.progress import ProgressReporter
from prefect_rayllm.tasks.reporting import artifact_key
from prefect_rayllm.tasks.runtime import worker_logs_to_task

Rows = Any  # a ray.data.Dataset or a list of row dicts


# -- the flow's tasks ------------------------------------------------------------------------


@task(name="prepare-curation", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def prepare_curation(config: CurationConfig, overwrite: bool = False) -> Preparation:
    """List the images and start, resume, or refuse (another run's settings in the output).

    Raises:
        ResumeRefused: the output holds a run with other settings and not `overwrite`.

    Example:
        ```python
        @flow
        def how_many(config: CurationConfig) -> int:
            return prepare_curation(config).total_rows
        ```
    """
    preparation = CurationJob(config).prepare(overwrite=overwrite)
    logger = get_run_logger()
    if preparation.resumed:
        logger.info(
            "resuming %s: %d of %d images already have a record", config.output, preparation.done_rows, preparation.total_rows
        )
    else:
        logger.info("starting %s: %d images", config.output, preparation.total_rows)
    return preparation


@task(name="curate-images", cache_policy=NO_CACHE, persist_result=False, **EXECUTION_RETRIES)
@worker_logs_to_task
def run_curation(config: CurationConfig) -> Execution:
    """Fetch, decode, caption and score every image without a record, as one streaming pipeline;
    records are committed as they arrive, so a retry resumes where this stopped."""
    reporter = ProgressReporter(artifact_key("curation-progress", config.output), "Curation")
    execution = CurationJob(config).execute(on_progress=reporter)
    get_run_logger().info(
        "attempt %d: %d images through the pipeline (%d rejected on the way) in %.1f s",
        execution.attempt,
        execution.rows,
        execution.errors,
        execution.seconds,
    )
    return execution


@task(name="finalize-curation", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def finalize_curation(config: CurationConfig, execution: Execution | None = None, flow_run_id: str | None = None) -> Manifest:
    """Rules and dedup over all records; curated/rejected Parquet, contact sheet and manifest."""
    manifest = CurationJob(config).finalize(flow_run_id=flow_run_id, execution=execution)
    get_run_logger().info(
        "%d images: %d curated, %d rejected (%s)",
        manifest.counts.total,
        manifest.counts.completed,
        manifest.counts.failed,
        _section(manifest).rejected_by_stage,
    )
    return manifest


def _section(manifest: Manifest) -> CurationSection:
    if manifest.curation is None:
        raise ValueError(f"not a curation manifest (job {manifest.job!r})")
    return manifest.curation


def stage_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The per-stage table: images in, passed and rejected per stage, with the reasons counted."""
    rows = [
        {
            "stage": s["stage"],
            "images in": s["in"],
            "passed": s["passed"],
            "rejected": s["rejected"],
            "rejected because": "; ".join(f"{reason}: {count}" for reason, count in s["reasons"].items()),
        }
        for s in _section(manifest).funnel
    ]
    counts = manifest.counts
    return rows + [
        {
            "stage": "curated",
            "images in": counts.total,
            "passed": counts.completed,
            "rejected": counts.failed,
            "rejected because": "",
        }
    ]


def report_markdown(manifest: Manifest, sheet: tuple[str, bytes] | None) -> str:
    """The report: counts, the funnel, reasons, fetch retries, the contact sheet inline, outputs."""
    section, counts = _section(manifest), manifest.counts
    fetch = section.fetch
    lines = [
        "# Image curation",
        "",
        f"{counts.completed:,} of {counts.total:,} images kept with `{manifest.model.get('name', '')}` "
        f"({manifest.throughput.rows_per_s} images/s; attempts: "
        + ", ".join(f"#{int(a['attempt'])} {int(a['rows'])} images" for a in manifest.attempts)
        + ").",
        "",
        "| stage | images in | passed | rejected |",
        "| --- | --- | --- | --- |",
        *[f"| {s['stage']} | {s['in']} | {s['passed']} | {s['rejected']} |" for s in section.funnel],
        "",
        "| rejected because | images |",
        "| --- | --- |",
        *[f"| {reason} | {count} |" for reason, count in section.rejected_by_reason.items()],
        "",
        (
            f"Fetch: {fetch['gets']} GETs, {fetch['retries']} retries over {fetch['retried_images']} images, "
            f"{fetch['recovered_images']} of them read in the end, {fetch['gave_up_images']} given up."
        ),
    ]
    if sheet is not None:
        mime, data = sheet
        shown = section.contact_sheet
        lines += [
            "",
            f"## Contact sheet ({len(shown.get('kept', []))} kept, {len(shown.get('rejected', []))} rejected)",
            "",
            f"![contact sheet](data:{mime};base64,{base64.b64encode(data).decode()})",
        ]
    lines += ["", "| output | location |", "| --- | --- |", *[f"| {k} | `{v}` |" for k, v in manifest.outputs.items()]]
    return "\n".join(lines) + "\n"


@task(name="publish-curation-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_curation_report(config: CurationConfig, manifest: Manifest) -> None:
    """Per-stage table and a markdown report with the contact sheet (the flow then emits
    `rayllm.curation.completed`)."""
    create_table_artifact(
        stage_rows(manifest),
        key=artifact_key("curation-stages", config.output),
        description="Images per stage, and why they were rejected",
    )
    sheet = None
    if "contact_sheet" in manifest.outputs:
        with Location(manifest.outputs["contact_sheet"], with_storage_credentials(config).storage_options).open("rb") as handle:
            sheet = compact_for_markdown(handle.read())
    create_markdown_artifact(
        report_markdown(manifest, sheet), key=artifact_key("curation-report", config.output), description="Curation report"
    )


# -- the stages one at a time ------------------------------------------------------------------


@task(name="fetch-images", cache_policy=NO_CACHE)
def fetch_images(data: Rows, config: FetchConfig | dict[str, Any] | None = None, workers: int = 2) -> Rows:
    """Read each row's `uri` (or each URI of a list of strings) with retries.

    Adds `image_bytes`, `fetch_error` ("" when read; else the URI and the cause) and
    `fetch_attempts`. Transient failures (5xx, SlowDown, resets, timeouts) are retried with
    backoff; a missing or denied object is an error row at once.

    Example:
        ```python
        @flow
        def sizes(uris: list[str]):
            return [len(r["image_bytes"]) for r in fetch_images(uris)]
        ```
    """
    return stages.fetch_stage(data, with_storage_credentials(FetchConfig.model_validate(config or {})), workers)


@task(name="decode-images", cache_policy=NO_CACHE)
def decode_images(data: Rows, config: DecodeConfig | dict[str, Any] | None = None, workers: int = 1) -> Rows:
    """Check and normalise fetched images (Pillow): adds `image` (PNG), sizes, format, frames,
    sha256, pHash and `decode_error` (bombs, truncated, non-image and empty files name the reason).

    Example:
        ```python
        @flow
        def hashes(uris: list[str]):
            return [r["phash"] for r in decode_images(fetch_images(uris))]
        ```
    """
    return stages.decode_stage(data, config, workers)


@task(name="caption-images", cache_policy=NO_CACHE)
@worker_logs_to_task
def caption_images(
    data: Rows,
    model: ModelSpec,
    prompt: str = DEFAULT_PROMPT,
    json_schema: dict[str, Any] | None = None,
    sampling: SamplingParams | None = None,
) -> Rows:
    """Caption and score decoded images with a VLM (Ray Data LLM, vLLM); rows become records
    (`caption`, `scores` JSON, `stage`/`reason` for rows that failed here or earlier).

    Needs a connected Ray (`prefect_rayllm.tasks.runtime.connect_ray`). Example:
        ```python
        @flow
        def captions(uris: list[str]):
            connect_ray()
            model = ModelSpec(source="./models/tiny-vlm", engine_kwargs={"max_model_len": 512})
            return [r["caption"] for r in caption_images(decode_images(fetch_images(uris)), model)]
        ```
    """
    return stages.caption_stage(data, model, prompt, json_schema, sampling)


@task(name="filter-images", cache_policy=NO_CACHE)
def filter_images(data: Rows, config: FilterConfig | dict[str, Any] | None = None) -> Rows:
    """Reject records that fail the rules (size, aspect ratio, VLM score thresholds) with
    `stage` "filter" and the reason; records already rejected pass through.

    Example:
        ```python
        @flow
        def big_enough(records: list[dict]):
            return [r for r in filter_images(records, {"min_width": 256}) if not r["stage"]]
        ```
    """
    return stages.apply_rules(data, config)


@task(name="dedup-images", cache_policy=NO_CACHE)
def dedup_images(data: Rows, config: FilterConfig | dict[str, Any] | None = None) -> Rows:
    """Reject exact (sha256) and near (pHash) duplicates with `stage` "dedup", keeping the first
    by URI; the reason names the image kept. A Dataset is collected (records carry no pixels).

    Example:
        ```python
        @flow
        def unique(records: list[dict]):
            return [r["uri"] for r in dedup_images(records, {"phash_max_distance": 4}) if not r["stage"]]
        ```
    """
    return stages.drop_duplicates(data, config)


@task(name="write-curation", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_curation(
    data: Rows,
    output: str,
    storage_options: dict[str, Any] | None = None,
    model_name: str = "",
    storage_block: str | None = None,
    fetch: FetchConfig | None = None,
    contact_sheet_images: int = 24,
) -> Manifest:
    """Write curated.parquet, rejected.parquet, contact_sheet.png and manifest.json; returns the manifest.

    Example:
        ```python
        @flow
        def save(records: list[dict]):
            return write_curation(dedup_images(filter_images(records)), "s3://bucket/curated/")
        ```
    """
    records = data.take_all() if hasattr(data, "take_all") else data
    return write_outputs(
        records,
        output,
        storage_options=storage_options_with_block(storage_block, storage_options),
        model_name=model_name,
        fetch=with_storage_credentials(fetch) if fetch is not None else None,
        contact_sheet_images=contact_sheet_images,
    )
