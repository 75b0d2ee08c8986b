"""Image curation without Prefect: S3 images -> fetch -> decode -> VLM caption and scores -> rules
and dedup -> curated and rejected Parquet datasets plus a manifest.

    URIs (listed lazily) --> Ray Dataset [uri]
      --FetchImages (many reads in flight per worker, retries)--> bytes or fetch_error
      --DecodeImages (CPU: checks, EXIF, RGB, resize, hashes)--> PNG or decode_error
      --ImageStep (vLLM through Ray's multimodal stage, JSON by structured outputs)--> caption, scores
      --> driver: rules (size, aspect, scores), exact and near dedup --> kept / rejected with a reason

The stages overlap: Ray Data streams blocks, so images are fetched while others decode and others
are captioned. Every input URI ends in exactly one of the curated and rejected datasets.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
from pydantic import Field, model_validator

from .config import ModelSpec, SamplingParams, StrictModel
from .engines import engine_error_of
from .image_decode import DecodeConfig, DecodeImages
from .image_fetch import FetchConfig, FetchImages
from .image_filter import FilterConfig, dedup, rule_rejections
from .image_source import ImageSourceConfig, iter_image_uris
from .storage import Location
from .vision import DEFAULT_SCORE_SCHEMA, IMAGE_COLUMN, ImageStep

ProgressCallback = Callable[[int, int], None]
METADATA = ("uri", "width", "height", "norm_width", "norm_height", "format", "frames", "byte_size", "sha256", "phash")


class CurationConfig(StrictModel):
    """One curation run. Example:

    ```yaml
    source: {url: s3://bucket/images/, include: ["*.jpg", "*.png"], limit: 10000}
    output: s3://bucket/curated/run-1/
    model: {source: ./models/tiny-vlm, engine_kwargs: {max_model_len: 512, dtype: float32}}
    filter: {min_width: 64, min_height: 64, score_thresholds: {quality: 3}, phash_max_distance: 6}
    ```
    """

    source: ImageSourceConfig
    output: str = Field(description="fsspec URL of the output folder")
    model: ModelSpec
    prompt: str = Field("Describe the image in a few words and rate its quality from 1 to 5.")
    json_schema: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_SCORE_SCHEMA))
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=64))
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    fetch_workers: int = Field(2, ge=1, description="fetch actors (each keeps fetch.max_concurrency reads in flight)")
    decode_workers: int = Field(1, ge=1)
    ray_address: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the output")

    @model_validator(mode="after")
    def _fetch_uses_source_credentials(self) -> CurationConfig:
        if not self.fetch.storage_options and self.source.storage_options:
            self.fetch = self.fetch.model_copy(update={"storage_options": self.source.storage_options})
        return self


def _to_vlm_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decoded columns -> the step's columns; a row that failed to fetch or decode carries its
    error (and stage) so the VLM step passes it through with a placeholder request."""
    rows = len(batch["uri"])
    out: dict[str, list[Any]] = {name: [] for name in ("row_index", "row_key", "row_json", "usage_json", IMAGE_COLUMN, "rayllm_error", "failed_step")}
    for i in range(rows):
        metadata = {name: _plain(batch[name][i]) for name in METADATA if name in batch}
        fetch_error, decode_error = str(batch["fetch_error"][i] or ""), str(batch["decode_error"][i] or "")
        out["row_index"].append(int(batch["row_index"][i]))
        out["row_key"].append(str(batch["uri"][i]))
        out["row_json"].append(json.dumps(metadata))
        out["usage_json"].append("{}")
        out[IMAGE_COLUMN].append(bytes(batch["image"][i] or b""))
        out["rayllm_error"].append(fetch_error or decode_error)
        out["failed_step"].append("fetch" if fetch_error else "decode" if decode_error else "")
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class CurationRun:
    """One curation run bound to its output location: `execute()` then the outputs are written."""

    def __init__(self, config: CurationConfig):
        self.config = config
        self.output = Location(config.output, config.storage_options)

    def pipeline(self, uris: list[str]):
        import pyarrow as pa
        import ray

        from .engines import build_engine_processor

        config = self.config
        table = pa.table({"uri": uris, "row_index": list(range(len(uris)))})
        dataset = ray.data.from_arrow(table).repartition(max(1, len(uris) // 16))
        dataset = dataset.map_batches(FetchImages, fn_constructor_kwargs={"config": config.fetch},
                                      concurrency=config.fetch_workers, num_cpus=0.25, batch_size=16)
        dataset = dataset.map_batches(DecodeImages, fn_constructor_kwargs={"config": config.decode},
                                      concurrency=config.decode_workers, num_cpus=0.5, batch_size=16)
        dataset = dataset.map_batches(_to_vlm_rows, num_cpus=0.25, batch_size=16)
        step = ImageStep(config.prompt, config.sampling.for_engine(), config.json_schema)
        return build_engine_processor(config.model, step)(dataset)

    def execute(self, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Run every stage, apply rules and dedup, write the datasets and the manifest."""
        started = time.time()
        uris = list(iter_image_uris(self.config.source))
        candidates: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        done = 0
        for row in self.pipeline(uris).iter_rows() if uris else []:
            error = engine_error_of(row)
            if error:
                rejected.append({"uri": row["row_key"], "stage": row.get("failed_step") or "caption", "reason": error})
            else:
                record = json.loads(row["row_json"])
                scores = record.pop("vlm")
                candidates.append({**record, "caption": scores.get("caption", ""), "scores": json.dumps(scores)})
            done += 1
            if on_progress and (done % 16 == 0 or done == len(uris)):
                on_progress(done, len(uris))
        kept = []
        for record in candidates:
            reason = rule_rejections({**record, "scores": json.loads(record["scores"])}, self.config.filter)
            if reason:
                rejected.append({"uri": record["uri"], "stage": "filter", "reason": reason})
            else:
                kept.append(record)
        duplicates = dedup(kept, self.config.filter)
        rejected += [{"uri": uri, "stage": "dedup", "reason": why} for uri, why in sorted(duplicates.dropped.items())]
        curated = [r for r in kept if r["uri"] not in duplicates.dropped]
        if len(curated) + len(rejected) != len(uris):
            raise RuntimeError(f"{len(uris) - len(curated) - len(rejected)} of {len(uris)} images are neither curated nor rejected")
        return self._write(uris, curated, rejected, time.time() - started)

    def _write(self, uris: list[str], curated: list[dict], rejected: list[dict], seconds: float) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        model_name = self.config.model.served_name
        curated_table = pa.Table.from_pylist([{**r, "model": model_name} for r in sorted(curated, key=lambda r: r["uri"])],
                                             schema=_curated_schema())
        rejected_table = pa.Table.from_pylist(sorted(rejected, key=lambda r: r["uri"]), schema=_rejected_schema())
        outputs = {"curated": self.output.child("curated.parquet"), "rejected": self.output.child("rejected.parquet"),
                   "manifest": self.output.child("manifest.json")}
        for name, table in (("curated", curated_table), ("rejected", rejected_table)):
            with outputs[name].open("wb") as handle:
                pq.write_table(table, handle)
        by_stage = Counter(r["stage"] for r in rejected)
        manifest = {
            "status": "completed",
            "input": len(uris),
            "curated": len(curated),
            "rejected": len(rejected),
            "rejected_by_stage": dict(sorted(by_stage.items())),
            "rejected_by_reason": dict(Counter(_reason_kind(r) for r in rejected).most_common()),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(uris) / seconds, 3) if seconds > 0 else None,
            "model": {"name": model_name, "source": self.config.model.source},
            "outputs": {name: location.url for name, location in outputs.items()},
        }
        outputs["manifest"].write_json(manifest)
        return manifest


def _reason_kind(rejection: dict[str, Any]) -> str:
    """A short key per reason for the counts (the full reason stays in the rejected dataset)."""
    reason = rejection["reason"]
    text = reason.split(": ", 1)[-1] if rejection["stage"] in ("fetch", "decode") else reason
    return f"{rejection['stage']}: {text.split(':')[0][:60]}"


def _curated_schema():
    import pyarrow as pa

    return pa.schema([
        ("uri", pa.string()), ("sha256", pa.string()), ("phash", pa.string()), ("width", pa.int64()),
        ("height", pa.int64()), ("norm_width", pa.int64()), ("norm_height", pa.int64()), ("format", pa.string()),
        ("frames", pa.int64()), ("byte_size", pa.int64()), ("caption", pa.string()), ("scores", pa.string()),
        ("model", pa.string()),
    ])


def _rejected_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
