"""Filter and dedup: rules per image, then exact and near-duplicate removal over the whole set.

Every dropped image gets a reason; a duplicate's reason names the image that was kept instead, so
the rejected dataset explains itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import StrictModel
from prefect_rayllm.rayllm_stages.curation.decode import hamming


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


class BKTree:
    """Hamming-distance BK-tree over 64-bit hashes.

    A query within distance d only visits children whose edge distance is within d of the node's,
    so for small thresholds a lookup touches a small part of the tree instead of every kept image
    (the O(n^2) all-pairs scan).
    """

    def __init__(self) -> None:
        self._root: list[Any] | None = None  # [hash, uri, {distance: child}]

    def add(self, phash: str, uri: str) -> None:
        node = [phash, uri, {}]
        if self._root is None:
            self._root = node
            return
        current = self._root
        while True:
            distance = hamming(phash, current[0])
            child = current[2].get(distance)
            if child is None:
                current[2][distance] = node
                return
            current = child

    def nearest_within(self, phash: str, max_distance: int) -> tuple[int, str] | None:
        """The closest stored (distance, uri) within `max_distance`; ties go to the smaller URI."""
        best: tuple[int, str] | None = None
        stack = [self._root] if self._root is not None else []
        while stack:
            node = stack.pop()
            distance = hamming(phash, node[0])
            if distance <= max_distance and (best is None or (distance, node[1]) < best):
                best = (distance, node[1])
            for edge, child in node[2].items():
                if distance - max_distance <= edge <= distance + max_distance:
                    stack.append(child)
        return best


@dataclass
class DedupResult:
    """Outcome of `dedup`: kept URIs in URI order and the reason for each dropped one."""

    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def dedup(records: Iterable[Mapping[str, Any]], config: FilterConfig) -> DedupResult:
    """Drop exact (sha256) and near (pHash distance) duplicates, keeping the first by URI order.

    `records` need `uri`, `sha256` and `phash` (decoded rows). Sorting by URI first makes the
    outcome independent of the order in which Ray returned the rows.
    """
    by_sha: dict[str, str] = {}
    tree = BKTree()
    result = DedupResult()
    for record in sorted(records, key=lambda r: str(r["uri"])):
        uri, sha, phash = str(record["uri"]), str(record["sha256"]), str(record["phash"])
        if config.exact_dedup and sha in by_sha:
            result.dropped[uri] = f"exact duplicate of {by_sha[sha]} (same sha256)"
            continue
        if config.phash_max_distance is not None and phash:
            near = tree.nearest_within(phash, config.phash_max_distance)
            if near is not None:
                result.dropped[uri] = f"near duplicate of {near[1]} (phash distance {near[0]})"
                continue
            tree.add(phash, uri)
        by_sha.setdefault(sha, uri)
        result.kept.append(uri)
    return result
