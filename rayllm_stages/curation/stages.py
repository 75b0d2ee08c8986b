"""The curation stages, each over a Ray Dataset (returns a lazy Dataset) or a list of rows (returns a
list, computed now), so they are usable one by one as well as composed into one pipeline:

    URIs --> image_dataset [uri, row_index]
      --fetch_stage  (FetchImages: many reads in flight per worker, retries)--> bytes or fetch_error
      --decode_stage (DecodeImages, CPU: checks, EXIF, RGB, resize, hashes)--> PNG or decode_error
      --caption_stage (vLLM through Ray's multimodal stage, JSON by structured outputs)--> records
      --apply_rules (size, aspect ratio, score thresholds)--> records, `stage` "filter" when rejected
      --drop_duplicates (sha256, pHash; collects the records)--> records, `stage` "dedup" when rejected

Fetch, decode and caption chained over a Dataset are one lazy Ray Data pipeline: images are fetched
while others decode and others are captioned; nothing is materialised between them. Rows that
failed at a stage carry its error through the later ones untouched (see `records`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams
from prefect_rayllm.rayllm_stages.curation.config import DEFAULT_PROMPT
from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig, DecodeImages
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig, FetchImages, object_column
from prefect_rayllm.rayllm_stages.curation.filters import FilterConfig, dedup, rule_rejections
from prefect_rayllm.rayllm_stages.curation.records import METADATA, as_record, empty_record, plain_value
from prefect_rayllm.rayllm_stages.llm.engines import LIGHT_MAP_KWARGS
from prefect_rayllm.rayllm_stages.llm.rows import ERROR_COLUMN, EngineSampling, RowFailure, failure_of, rows_table
from prefect_rayllm.rayllm_stages.llm.vision import DEFAULT_SCORE_SCHEMA, IMAGE_COLUMN, IMAGE_SCHEMA, ImageStep


def _is_dataset(data: Any) -> bool:
    try:
        from ray.data import Dataset
    except ImportError:
        return False
    return isinstance(data, Dataset)


def _as_rows(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows as dicts; a plain string is a row with just that `uri`."""
    return [{"uri": r} if isinstance(r, str) else {k: plain_value(v) for k, v in dict(r).items()} for r in rows]


def _to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r.get(name) for r in rows]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        columns[name] = np.array(values, dtype=np.int64) if ints else object_column(values)
    return columns


def _from_batch(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values()))) if batch else 0
    return [{name: plain_value(column[i]) for name, column in batch.items()} for i in range(size)]


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


def _to_vlm_rows(batch: dict[str, np.ndarray]):
    """Decoded columns -> rows of the row contract (`llm.rows.ROW_SCHEMA`) plus the image; a row
    that failed to fetch or decode carries its error (and stage), so the VLM step passes it by."""
    count = len(batch["uri"])
    empty = [""] * count
    fetch_errors, decode_errors = batch.get("fetch_error", empty), batch.get("decode_error", empty)
    indexes = batch.get("row_index", range(count))
    out = []
    for i in range(count):
        metadata = {name: plain_value(batch[name][i]) for name in METADATA if name in batch}
        fetch_error, decode_error = str(fetch_errors[i] or ""), str(decode_errors[i] or "")
        image = batch["image"][i] if "image" in batch else b""
        row: dict[str, Any] = {
            "row_index": int(indexes[i]),
            "row_key": str(batch["uri"][i]),
            "row_json": json.dumps(metadata),
            IMAGE_COLUMN: bytes(image or b""),
        }
        if fetch_error or decode_error:
            stage = "fetch" if fetch_error else "decode"
            row[ERROR_COLUMN] = RowFailure(code=f"{stage}_error", message=fetch_error or decode_error, step=stage).column()
        out.append(row)
    return rows_table(out, extra=IMAGE_SCHEMA)


def _record_from_vlm_row(row: dict[str, Any]) -> dict[str, Any]:
    """A processor output row -> a record (see the module docstring)."""
    metadata = json.loads(row.get("row_json") or "{}")
    record = empty_record(str(row["row_key"]), int(row.get("row_index", -1)))
    record.update({k: metadata[k] for k in METADATA if metadata.get(k) is not None})
    failure = failure_of(row)
    if failure is not None:
        record.update(stage=failure.step or "caption", reason=failure.message)
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
    `decode_error`). Rows that already failed pass the VLM step by untouched and keep their
    error. Dataset in -> lazy Dataset of records; rows in -> records (runs the engine now).
    """
    import ray

    from prefect_rayllm.rayllm_stages.llm.engines import build_engine_processor

    sampling = sampling or SamplingParams(max_tokens=64)
    step = ImageStep(prompt, EngineSampling.from_params(sampling), json_schema or DEFAULT_SCORE_SCHEMA)
    if not _is_dataset(data):
        rows = _as_rows(data)
        for position, row in enumerate(rows):
            row.setdefault("row_index", position)
        if not rows:
            return []
        records = caption_stage(ray.data.from_items(rows), model, prompt, json_schema, sampling).take_all()
        return sorted((as_record(r) for r in records), key=lambda r: r["row_index"])
    steps = data.map_batches(_to_vlm_rows, batch_size=16, batch_format="numpy", **LIGHT_MAP_KWARGS)
    return build_engine_processor(model, step)(steps).map(_record_from_vlm_row, **LIGHT_MAP_KWARGS)


def _rule_record(row: Mapping[str, Any], config: FilterConfig) -> dict[str, Any]:
    record = as_record(row)
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
    records = [as_record(r) for r in (data.take_all() if is_dataset else data)]
    result = dedup([r for r in records if not r["stage"]], FilterConfig.model_validate(config or {}))
    marked = [
        {**r, "stage": "dedup", "reason": result.dropped[r["uri"]]} if r["uri"] in result.dropped and not r["stage"] else r
        for r in records
    ]
    if is_dataset:
        import ray

        return ray.data.from_items(marked)
    return marked


def stream_rows(dataset) -> Iterable[dict[str, Any]]:
    """A Dataset's rows as soon as each block is out of the pipeline.

    `Dataset.iter_rows()` prefetches: it asks for the next block before handing over the current
    one, so the newest finished block waits in the object store until another is done (or the
    stream ends). Here that would hold finished records back from the run log (and from the
    progress bar) for a block's worth of work; without prefetch they are committed as they come.
    """
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from batch.to_pylist()


__all__ = [
    "apply_rules",
    "caption_stage",
    "decode_stage",
    "drop_duplicates",
    "fetch_batch_size",
    "fetch_stage",
    "image_dataset",
    "stream_rows",
]
