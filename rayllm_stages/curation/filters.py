"""Filter and dedup: rules per image, then exact and near-duplicate removal over the whole set.

Every dropped image gets a reason; a duplicate's reason names the image that was kept instead, so
the rejected dataset explains itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import StrictModel
from prefect_rayllm.rayllm_stages.curation.dedup import DedupResult
from prefect_rayllm.rayllm_stages.curation.dedup import dedup as dedup_records


class FilterConfig(StrictModel):
    """Rules an image must pass, and how duplicates are found."""

    min_width: int = Field(1, ge=1, description="pixels, original upright size")
    min_height: int = Field(1, ge=1)
    min_aspect_ratio: float | None = Field(None, gt=0, description="width / height at least this")
    max_aspect_ratio: float | None = Field(None, gt=0, description="width / height at most this")
    score_thresholds: dict[str, float] = Field(
        default_factory=dict, description="VLM score field -> minimum value, e.g. {quality: 0.5}"
    )
    exact_dedup: bool = Field(True, description="drop images whose bytes (sha256) were already kept")
    phash_max_distance: int | None = Field(
        6, ge=0, le=64, description="drop images within this many pHash bits of a kept one (None: off)"
    )

    @model_validator(mode="after")
    def _aspect_range(self) -> FilterConfig:
        low, high = self.min_aspect_ratio, self.max_aspect_ratio
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_aspect_ratio {low} is above max_aspect_ratio {high}")
        return self


def row_scores(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The VLM scores of a row: its `scores` column (dict or JSON text), else the row itself."""
    scores = row.get("scores")
    if isinstance(scores, str) and scores:
        try:
            scores = json.loads(scores)
        except json.JSONDecodeError:
            return {}
    return scores if isinstance(scores, Mapping) else row


def rule_rejections(row: Mapping[str, Any], config: FilterConfig) -> str | None:
    """Why this decoded row fails the rules, or None when it passes. Needs `width` and `height`."""
    width, height = int(row["width"]), int(row["height"])
    if width < config.min_width or height < config.min_height:
        return f"too small: {width}x{height}, minimum {config.min_width}x{config.min_height}"
    aspect = width / height
    if config.min_aspect_ratio is not None and aspect < config.min_aspect_ratio:
        return f"aspect ratio {aspect:.3f} below min_aspect_ratio {config.min_aspect_ratio}"
    if config.max_aspect_ratio is not None and aspect > config.max_aspect_ratio:
        return f"aspect ratio {aspect:.3f} above max_aspect_ratio {config.max_aspect_ratio}"
    scores = row_scores(row) if config.score_thresholds else {}
    for name, minimum in sorted(config.score_thresholds.items()):
        value = scores.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"score '{name}' missing or not a number ({value!r})"
        if value < minimum:
            return f"score '{name}' = {value} below {minimum}"
    return None


def dedup(records: Iterable[Mapping[str, Any]], config: FilterConfig) -> DedupResult:
    """Drop exact (sha256) and near (pHash distance) duplicates, keeping the first by URI order
    (`curation.dedup`: multi-index hashing, a million records in seconds)."""
    return dedup_records(records, exact=config.exact_dedup, max_distance=config.phash_max_distance)
