"""`CurationConfig`: one curation run (source, model, prompt and schema, fetch, decode, filter, output)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import OutputJobConfig
from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams
from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig
from prefect_rayllm.rayllm_stages.curation.filters import FilterConfig
from prefect_rayllm.rayllm_stages.curation.source import ImageSourceConfig
from prefect_rayllm.rayllm_stages.llm.vision import DEFAULT_SCORE_SCHEMA

DEFAULT_PROMPT = "Describe the image in a few words and rate its quality from 1 to 5."


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
        fetch, source = self.fetch, self.source
        if not fetch.storage_options and not fetch.storage_block and (source.storage_options or source.storage_block):
            self.fetch = fetch.model_copy(
                update={"storage_options": source.storage_options, "storage_block": source.storage_block}
            )
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
