"""Image curation without Prefect: S3 images -> fetch -> decode -> VLM caption and scores -> rules
and dedup -> curated and rejected Parquet datasets, a manifest and a contact sheet.

    URIs (listed lazily) --> Ray Dataset [uri, row_index]
      --fetch_stage  (FetchImages: many reads in flight per worker, retries)--> bytes or fetch_error
      --decode_stage (DecodeImages, CPU: checks, EXIF, RGB, resize, hashes)--> PNG or decode_error
      --caption_stage (vLLM through Ray's multimodal stage, JSON by structured outputs)--> records
      --> driver: run log parts (resume) --> apply_rules --> drop_duplicates --> write_outputs

The first three stages are one lazy Ray Data pipeline, so images are fetched while others decode
and others are captioned; nothing is materialised between them.

A **record** is one image's row after `caption_stage` (the unit the run log, the rules, dedup and
the writer work on):

    uri, row_index, width, height, norm_width, norm_height, format, frames, byte_size, sha256,
    phash, fetch_attempts, caption, scores (JSON text), tokens_in, tokens_out, stage, reason

`stage` and `reason` are "" while the image is still in; once it is rejected they say where
(`fetch`, `decode`, `caption`, `filter`, `dedup`) and why, and later stages pass it through
untouched. Every input URI ends in exactly one of the curated and rejected datasets.

Each stage function takes a Ray Dataset (and returns one, lazily) or a list of rows (and returns
a list, computed now), so the stages are usable one by one as well as composed.

Resume: records are committed in parts under `<output>/_rayllm/parts/` as they stream in (the run
log of `prefect_rayllm.rayllm_stages.jobs.run_log`, as batch jobs use), keyed by URI. A rerun on the same output
computes only the listed images without a record (after a crash, the rest; on a prefix that grew
since, the new images), then applies rules and dedup to the records of every listed image, so
changing only the `filter` settings re-filters without calling the model. A change of model,
prompt, schema, sampling or decode settings is refused unless `overwrite`. An object rewritten
under the same key keeps its old record: `overwrite` recomputes everything.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import OutputJobConfig
from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams
from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig, DecodeImages
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig, FetchImages, object_column
from prefect_rayllm.rayllm_stages.curation.filters import FilterConfig, dedup, rule_rejections
from prefect_rayllm.rayllm_stages.curation.source import ImageSourceConfig, iter_image_uris
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog
from prefect_rayllm.rayllm_stages.llm.engines import LIGHT_MAP_KWARGS, engine_error_of
from prefect_rayllm.rayllm_stages.llm.vision import DEFAULT_SCORE_SCHEMA, IMAGE_COLUMN, ImageStep

ProgressCallback = Callable[[int, int], None]
DEFAULT_PROMPT = "Describe the image in a few words and rate its quality from 1 to 5."
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
CONTACT_SHEET = "contact_sheet.png"


class CurationConfig(OutputJobConfig):
    """One curation run. Example:

    ```yaml
    source: {url: s3://bucket/images/, include: ["*.jpg", "*.png"], limit: 10000}
    output: s3://bucket/curated/run-1/
    model: {source: ./models/tiny-vlm, engine_kwargs: {max_model_len: 512, dtype: float32}}
    filter: {min_width: 64, min_height: 64, score_thresholds: {quality: 3}, phash_max_distance: 6}
    ```
    """

    source: ImageSourceConfig
    model: ModelSpec
    prompt: str = Field(DEFAULT_PROMPT)
    json_schema: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_SCORE_SCHEMA))
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=64))
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    fetch_workers: int = Field(2, ge=1, description="fetch actors (each keeps fetch.max_concurrency reads in flight)")
    decode_workers: int = Field(1, ge=1)
    commit_every_rows: int = Field(256, ge=1, description="images per committed run-log part: the most a crash can cost")
    contact_sheet_images: int = Field(
        24, ge=0, le=96, description="images on the contact sheet, half kept, half rejected (0: none)"
    )

    @model_validator(mode="after")
    def _fetch_uses_source_credentials(self) -> CurationConfig:
        if not self.fetch.storage_options and self.source.storage_options:
            self.fetch = self.fetch.model_copy(update={"storage_options": self.source.storage_options})
        return self

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings that change an image's record (fetch sizing, retries and filter do not)."""
        return {
            **self.model.resume_fingerprint(),
            "prompt": self.prompt,
            "json_schema": self.json_schema,
            "sampling": self.sampling.model_dump(),
            "decode": self.decode.model_dump(exclude={"keep_original_bytes"}),
        }


# -- stages: each over a Ray Dataset (lazy) or a list of rows (now) ---------------------------


def _is_dataset(data: Any) -> bool:
    try:
        from ray.data import Dataset
    except ImportError:
        return False
    return isinstance(data, Dataset)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _as_rows(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows as dicts; a plain string is a row with just that `uri`."""
    return [{"uri": r} if isinstance(r, str) else {k: _plain(v) for k, v in dict(r).items()} for r in rows]


def _to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r.get(name) for r in rows]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        columns[name] = np.array(values, dtype=np.int64) if ints else object_column(values)
    return columns


def _from_batch(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values()))) if batch else 0
    return [{name: _plain(column[i]) for name, column in batch.items()} for i in range(size)]


def _apply_locally(
    udf: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], rows: Iterable[Any], batch_size: int
) -> list[dict[str, Any]]:
    rows = _as_rows(rows)
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        out.extend(_from_batch(udf(_to_batch(rows[start : start + batch_size]))))
    return out


def _actor_pool(workers: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=workers)


def fetch_batch_size(images: int, workers: int, max_concurrency: int) -> int:
    """Rows per fetch batch: enough to keep a worker's reads in flight, small enough that every
    worker gets batches even for a few images (one batch would leave all but one worker idle)."""
    return max(1, min(max_concurrency, math.ceil(images / max(1, workers))))


def image_dataset(uris: Sequence[str] | Sequence[tuple[int, str]], block_rows: int = 16):
    """A Ray Dataset of `uri` and `row_index`, in blocks of `block_rows` rows.

    `uris` are URIs (row_index = position) or (row_index, uri) pairs. Blocks are made here, one
    per `block_rows`, so the fetch stage's workers all receive input from the start.
    """
    import pyarrow as pa
    import ray

    pairs = [(i, u) if isinstance(u, str) else (int(u[0]), str(u[1])) for i, u in enumerate(uris)]
    block_rows = max(1, block_rows)
    tables = [
        pa.table({"uri": [u for _, u in chunk], "row_index": pa.array([i for i, _ in chunk], pa.int64())})
        for chunk in (pairs[s : s + block_rows] for s in range(0, len(pairs), block_rows))
    ]
    return ray.data.from_arrow(tables) if tables else ray.data.from_items([])


def fetch_stage(data: Any, config: FetchConfig | dict[str, Any] | None = None, workers: int = 2, batch_size: int | None = None):
    """Fetch each row's `uri`: adds `image_bytes`, `fetch_error` ("" when read), `fetch_attempts`.

    Args:
        data: a Ray Dataset with a `uri` column (returns a lazy Dataset), or rows / URIs (returns
            a list of rows, fetched now in this process).
        config: retries, concurrency and storage options (`FetchConfig`).
        workers: fetch actors (Dataset input).
        batch_size: rows per batch (default: the config's `max_concurrency`).
    """
    fetch = FetchConfig.model_validate(config or {})
    batch_size = batch_size or fetch.max_concurrency
    if not _is_dataset(data):
        return _apply_locally(FetchImages(fetch), data, batch_size)
    # Each actor holds a thread pool with max_concurrency reads in flight, so it needs a fraction
    # of a CPU: on a small machine the CPUs go to decoding and the model.
    return data.map_batches(
        FetchImages, fn_constructor_kwargs={"config": fetch}, compute=_actor_pool(workers), num_cpus=0.25, batch_size=batch_size
    )


def decode_stage(data: Any, config: DecodeConfig | dict[str, Any] | None = None, workers: int = 1, batch_size: int = 16):
    """Decode and normalise `image_bytes`: adds `image` (PNG/JPEG), sizes, format, hashes, `decode_error`.

    Rows that failed to fetch pass through with empty decode columns. Dataset in -> lazy Dataset
    out; rows in -> rows out (decoded now, in this process).
    """
    config = DecodeConfig.model_validate(config or {})
    if not _is_dataset(data):
        return _apply_locally(DecodeImages(config), data, batch_size)
    return data.map_batches(
        DecodeImages, fn_constructor_kwargs={"config": config}, compute=_actor_pool(workers), num_cpus=0.5, batch_size=batch_size
    )


def _to_vlm_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decoded columns -> the step's columns; a row that failed to fetch or decode carries its
    error (and stage) so the VLM step passes it through with a placeholder request."""
    rows = len(batch["uri"])
    empty = [""] * rows
    fetch_errors, decode_errors = batch.get("fetch_error", empty), batch.get("decode_error", empty)
    indexes = batch.get("row_index", range(rows))
    out: dict[str, list[Any]] = {
        name: [] for name in ("row_index", "row_key", "row_json", "usage_json", IMAGE_COLUMN, "rayllm_error", "failed_step")
    }
    for i in range(rows):
        metadata = {name: _plain(batch[name][i]) for name in METADATA if name in batch}
        fetch_error, decode_error = str(fetch_errors[i] or ""), str(decode_errors[i] or "")
        image = batch["image"][i] if "image" in batch else b""
        out["row_index"].append(int(indexes[i]))
        out["row_key"].append(str(batch["uri"][i]))
        out["row_json"].append(json.dumps(metadata))
        out["usage_json"].append("{}")
        out[IMAGE_COLUMN].append(bytes(image or b""))
        out["rayllm_error"].append(fetch_error or decode_error)
        out["failed_step"].append("fetch" if fetch_error else "decode" if decode_error else "")
    return out


def empty_record(uri: str, row_index: int = -1) -> dict[str, Any]:
    record: dict[str, Any] = {name: 0 for name in INT_FIELDS}
    record.update({name: "" for name in STR_FIELDS})
    record.update(uri=uri, row_index=row_index)
    return record


def _record_from_vlm_row(row: dict[str, Any]) -> dict[str, Any]:
    """A processor output row -> a record (see the module docstring)."""
    metadata = json.loads(row.get("row_json") or "{}")
    record = empty_record(str(row["row_key"]), int(row.get("row_index", -1)))
    record.update({k: metadata[k] for k in METADATA if metadata.get(k) is not None})
    error = engine_error_of(row)
    if error:
        record.update(stage=str(row.get("failed_step") or "caption"), reason=str(error))
        return record
    scores = metadata.get("vlm") or {}
    record.update(
        caption=str(scores.get("caption", "")),
        scores=json.dumps(scores, ensure_ascii=False),
        tokens_in=int(row.get("num_input_tokens") or 0),
        tokens_out=int(row.get("num_generated_tokens") or 0),
    )
    return record


def caption_stage(
    data: Any,
    model: ModelSpec,
    prompt: str = DEFAULT_PROMPT,
    json_schema: dict[str, Any] | None = None,
    sampling: SamplingParams | None = None,
):
    """Caption and score decoded images with a VLM (Ray Data LLM + vLLM); rows become records.

    Input rows need `uri` and the decode columns (`image`, metadata, `fetch_error`,
    `decode_error`). Rows that already failed get a one-token placeholder request and keep their
    error. Dataset in -> lazy Dataset of records; rows in -> records (runs the engine now).
    """
    import ray

    from prefect_rayllm.rayllm_stages.llm.engines import build_engine_processor

    sampling = sampling or SamplingParams(max_tokens=64)
    step = ImageStep(prompt, sampling.for_engine(), json_schema or DEFAULT_SCORE_SCHEMA)
    if not _is_dataset(data):
        rows = _as_rows(data)
        for position, row in enumerate(rows):
            row.setdefault("row_index", position)
        if not rows:
            return []
        records = caption_stage(ray.data.from_items(rows), model, prompt, json_schema, sampling).take_all()
        return sorted((_plain_record(r) for r in records), key=lambda r: r["row_index"])
    steps = data.map_batches(_to_vlm_rows, batch_size=16, **LIGHT_MAP_KWARGS)
    return build_engine_processor(model, step)(steps).map(_record_from_vlm_row, **LIGHT_MAP_KWARGS)


def _plain_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record from a row: a record, or a fetched/decoded row (its fetch or decode error becomes
    the record's stage and reason, so the rules, dedup and writer also work without the VLM)."""
    record = empty_record(str(row["uri"]))
    record.update({k: _plain(v) for k, v in row.items() if k in RECORD_FIELDS})
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


def _rule_record(record: Mapping[str, Any], config: FilterConfig) -> dict[str, Any]:
    record = _plain_record(record)
    if record["stage"]:
        return record
    reason = rule_rejections(record, config)
    return {**record, "stage": "filter", "reason": reason} if reason else record


def apply_rules(data: Any, config: FilterConfig | dict[str, Any] | None = None):
    """Reject records that fail the rules (size, aspect ratio, score thresholds): `stage` "filter".

    Dataset in -> lazy Dataset out; records in -> records out.
    """
    config = FilterConfig.model_validate(config or {})
    if _is_dataset(data):
        return data.map(functools.partial(_rule_record, config=config), **LIGHT_MAP_KWARGS)
    return [_rule_record(r, config) for r in data]


def drop_duplicates(data: Any, config: FilterConfig | dict[str, Any] | None = None):
    """Reject exact (sha256) and near (pHash) duplicates among the records still in: `stage` "dedup".

    Dedup compares every image with every kept one, so a Dataset is collected to the driver (the
    records are small: no pixels) and a Dataset of the marked records is returned.
    """
    is_dataset = _is_dataset(data)
    records = [_plain_record(r) for r in (data.take_all() if is_dataset else data)]
    result = dedup([r for r in records if not r["stage"]], FilterConfig.model_validate(config or {}))
    marked = [
        {**r, "stage": "dedup", "reason": result.dropped[r["uri"]]} if r["uri"] in result.dropped and not r["stage"] else r
        for r in records
    ]
    if is_dataset:
        import ray

        return ray.data.from_items(marked)
    return marked


# -- outputs ---------------------------------------------------------------------------------


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


def reason_kind(stage: str, reason: str) -> str:
    """A short key per kind of reason, for counts (the full reason stays in rejected.parquet)."""
    import re

    text = reason
    if stage in ("fetch", "decode") and ": " in text:
        text = text.split(": ", 1)[1]  # drop the leading "<uri>: "
    if stage == "dedup":
        text = text.split(" of ", 1)[0]
    elif stage == "caption":
        text = text.removeprefix("step caption: ")
    text = (text.split(":")[0] if stage != "filter" else text).split(" (")[0]
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return f"{stage}: {text[:60]}"


def funnel(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: images in, passed, rejected, and rejected by kind of reason."""
    rows, remaining = [], len(records)
    stages = list(STAGES) + sorted({r["stage"] for r in records if r["stage"] and r["stage"] not in STAGES})
    for stage in stages:
        reasons = Counter(reason_kind(stage, r["reason"]).split(": ", 1)[1] for r in records if r["stage"] == stage)
        rejected = sum(reasons.values())
        rows.append(
            {
                "stage": stage,
                "in": remaining,
                "passed": remaining - rejected,
                "rejected": rejected,
                "reasons": dict(reasons.most_common()),
            }
        )
        remaining -= rejected
    return rows


def fetch_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """GETs made, images that needed retries, and how many of those were read in the end."""
    retried = [r for r in records if int(r.get("fetch_attempts") or 0) > 1]
    return {
        "gets": sum(int(r.get("fetch_attempts") or 0) for r in records),
        "retries": sum(int(r["fetch_attempts"]) - 1 for r in retried),
        "retried_images": len(retried),
        "recovered_images": sum(1 for r in retried if r["stage"] != "fetch"),
        "gave_up_images": sum(1 for r in records if r["stage"] == "fetch" and "gave up after" in r["reason"]),
    }


def sample_for_sheet(records: Sequence[Mapping[str, Any]], images: int) -> tuple[list[Mapping], list[Mapping]]:
    """Up to `images` records, half kept (spread over URI order), half rejected (stages in turn)."""
    kept = sorted((r for r in records if not r["stage"]), key=lambda r: r["uri"])
    by_stage: dict[str, list[Mapping]] = {}
    for record in sorted((r for r in records if r["stage"]), key=lambda r: r["uri"]):
        by_stage.setdefault(record["stage"], []).append(record)
    rejected: list[Mapping] = []
    queues = [by_stage[s] for s in [*STAGES, *sorted(set(by_stage) - set(STAGES))] if s in by_stage]
    while queues and len(rejected) < images:
        for queue in list(queues):
            if queue:
                rejected.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    want_kept = min(len(kept), max(images // 2, images - len(rejected)))
    rejected = rejected[: images - want_kept]
    step = len(kept) / want_kept if want_kept else 1
    return [kept[int(i * step)] for i in range(want_kept)], rejected


def contact_sheet(
    records: Sequence[Mapping[str, Any]], images: int, fetch: FetchConfig, thumb: int = 96
) -> tuple[bytes, dict[str, list[str]]]:
    """A PNG of a sample of kept and rejected images, and the sampled URIs.

    The sample's bytes are read again (with the fetch stage's retries) rather than carried through
    the pipeline; an image that failed to fetch or decode gets a placeholder tile with its reason.
    """
    from prefect_rayllm.rayllm_stages.curation.contact_sheet import Tile, render_contact_sheet, thumbnail

    kept, rejected = sample_for_sheet(records, images)
    fetcher = FetchImages(fetch)

    def tile(record: Mapping[str, Any]) -> Tile:
        stage = record["stage"] or "kept"
        reason = reason_kind(stage, record["reason"]).split(": ", 1)[1] if record["stage"] else ""
        if stage in ("fetch", "decode"):  # no bytes to show: the tile says why, without the URI
            detail = record["reason"].removeprefix(f"{record['uri']}: ")
            return Tile(record["uri"], stage, detail)
        data, error, _ = fetcher.fetch_one(record["uri"])
        if error:
            return Tile(record["uri"], stage, f"{reason} (not readable for the sheet: {error})".strip())
        try:
            return Tile(record["uri"], stage, reason, thumbnail(data, thumb))
        except Exception as exc:
            return Tile(record["uri"], stage, f"{reason} (not decodable for the sheet: {exc})".strip())

    with ThreadPoolExecutor(8) as pool:
        kept_tiles, rejected_tiles = list(pool.map(tile, kept)), list(pool.map(tile, rejected))
    png = render_contact_sheet(kept_tiles, rejected_tiles, thumb=thumb)
    return png, {"kept": [r["uri"] for r in kept], "rejected": [r["uri"] for r in rejected]}


def write_outputs(
    records: Sequence[Mapping[str, Any]],
    output: str | Location,
    *,
    storage_options: dict[str, Any] | None = None,
    model_name: str = "",
    fetch: FetchConfig | None = None,
    contact_sheet_images: int = 24,
    expected: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write curated.parquet, rejected.parquet, contact_sheet.png and manifest.json; return the manifest.

    `records` are marked records (after rules and dedup). `expected`: the number of input images;
    when given, the write is refused unless every one of them is curated or rejected.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = output if isinstance(output, Location) else Location(output, storage_options or {})
    records = [_plain_record(r) for r in records]
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
    steps = funnel(records)
    manifest = {
        "status": "completed",
        "input": len(records),
        "curated": len(curated),
        "rejected": len(rejected),
        "rejected_by_stage": {s["stage"]: s["rejected"] for s in steps if s["rejected"]},
        "rejected_by_reason": dict(Counter(reason_kind(r["stage"], r["reason"]) for r in rejected).most_common()),
        "funnel": steps,
        "fetch": fetch_summary(records),
        "tokens": {"in": sum(r["tokens_in"] for r in records), "out": sum(r["tokens_out"] for r in records)},
        "contact_sheet": sheet,
        **(extra or {}),
        "outputs": {name: loc.url for name, loc in outputs.items()},
    }
    outputs["manifest"].write_json(manifest)
    return manifest


def stream_rows(dataset) -> Iterable[dict[str, Any]]:
    """A Dataset's rows as soon as each block is out of the pipeline.

    `Dataset.iter_rows()` prefetches: it asks for the next block before handing over the current
    one, so the newest finished block waits in the object store until another is done (or the
    stream ends). Here that would hold finished records back from the run log (and from the
    progress bar) for a block's worth of work; without prefetch they are committed as they come.
    """
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from batch.to_pylist()


# -- one run, resumable and incremental -------------------------------------------------------


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
                record = _plain_record(row)
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


__all__ = [
    "CurationConfig",
    "CurationRun",
    "apply_rules",
    "caption_stage",
    "decode_stage",
    "drop_duplicates",
    "fetch_stage",
    "image_dataset",
    "write_outputs",
]
