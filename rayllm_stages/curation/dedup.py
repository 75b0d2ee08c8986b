"""Exact and near-duplicate removal that scales: sha256 for exact copies, multi-index hashing on pHash.

Near duplicates are 64-bit pHashes within `max_distance` bits. The pigeonhole principle finds every
such pair without comparing all of them: cut the hash into `max_distance + s` bands; two hashes
within `max_distance` bits differ in at most `max_distance` bands, so at least `s` bands are equal.
For each choice of `s` bands, hashes are sorted by those bands' bits and only hashes with equal bits
are compared. With the default distance 6, `s = 3` gives 84 sorts of the unique hashes and a few
candidate pairs per million, instead of n^2 / 2 comparisons (a million records in seconds).

Which image is kept is decided as before, greedily in URI order (so the outcome never depends on
the order Ray returned rows): an image is dropped when its bytes equal a kept image's, or when a
kept image lies within the distance (the closest one is named; ties go to the smaller URI). A flat
image (no detail, so its pHash would be noise: `decode.perceptual_hash`) has a colour key instead,
and is a duplicate only of a kept flat image of the same colour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.curation.decode import flat_colour, is_flat

FLAT_COLOUR_TOLERANCE = 12  # levels of 255 per channel: re-encoding moves a flat colour a few
_BRUTE_FORCE_MAX = 4096  # unique hashes; below this, comparing all pairs is cheaper than sorting


@dataclass
class DedupResult:
    """Outcome of `dedup`: kept URIs in URI order and the reason for each dropped one."""

    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def hashes_to_uint64(phashes: Sequence[str]) -> np.ndarray:
    """16-hex-digit pHashes as unsigned 64-bit integers (vectorised: one hex decode for all)."""
    if not phashes:
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(phashes)), dtype=">u8").astype(np.uint64)


def _band_edges(bands: int) -> list[tuple[int, int]]:
    """(lowest bit, width) of each band; bands are contiguous and cover the 64 bits."""
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    return [(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _sorted_by_bands(hashes: np.ndarray, chosen: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """The hashes' indices sorted by the chosen bands' bits, and those bits (compacted) in that order.

    Key and index share one uint64 (key above, index below), so one plain sort replaces an argsort.
    """
    index_bits = max(1, int(len(hashes) - 1).bit_length())
    key = np.zeros(len(hashes), dtype=np.uint64)
    for lo, width in chosen:
        key = (key << np.uint64(width)) | ((hashes >> np.uint64(lo)) & np.uint64((1 << width) - 1))
    key_bits = sum(width for _, width in chosen)
    if key_bits + index_bits > 64:  # very large inputs or wide keys: fall back to an argsort
        order = np.argsort(key, kind="stable")
        return order, key[order]
    packed = np.sort((key << np.uint64(index_bits)) | np.arange(len(hashes), dtype=np.uint64))
    return (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64), packed >> np.uint64(index_bits)


def choose_bands(max_distance: int, unique: int) -> tuple[int, int] | None:
    """(bands, equal bands needed) that make the fewest comparisons, or None when a full scan is cheaper."""
    best: tuple[float, int, int] | None = None
    for equal in range(1, 9):
        bands = max_distance + equal
        if bands > 64:
            break
        tables = math.comb(bands, equal)
        key_bits = 64 * equal // bands
        # A candidate pair costs several times a sorted element (gather, xor, popcount, filter).
        cost = tables * (unique + 8 * unique * unique / 2 ** (key_bits + 1))
        if best is None or cost < best[0]:
            best = (cost, bands, equal)
    if best is None or best[0] > 4 * unique * unique:
        return None
    return best[1], best[2]


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of distinct hashes within `max_distance` bits: arrays i, j and distance."""
    n = len(hashes)
    plan = None if n <= _BRUTE_FORCE_MAX else choose_bands(max_distance, n)
    if plan is None:
        first, second = (index.astype(np.int64) for index in np.triu_indices(n, k=1))
        first, second = _close(hashes, first, second, max_distance)
    else:
        first, second = _banded_pairs(hashes, max_distance, *plan)
    return first, second, np.bitwise_count(hashes[first] ^ hashes[second]).astype(np.int64)


def _close(hashes: np.ndarray, first: np.ndarray, second: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    keep = (np.bitwise_count(hashes[first] ^ hashes[second]) <= max_distance) & (first != second)
    return first[keep], second[keep]


def _banded_pairs(hashes: np.ndarray, max_distance: int, bands: int, equal: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.int64(len(hashes))
    found: list[np.ndarray] = []
    for chosen in combinations(_band_edges(bands), equal):
        order, sorted_key = _sorted_by_bands(hashes, chosen)
        step = 1
        while step < len(order):  # equal keys are adjacent once sorted: pair each with the next `step`
            same = sorted_key[:-step] == sorted_key[step:]
            if not same.any():
                break
            a, b = order[:-step][same], order[step:][same]
            low, high = _close(hashes, np.minimum(a, b), np.maximum(a, b), max_distance)
            found.append(low * n + high)
            step += 1
    pairs = np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    if not len(pairs):
        return pairs, pairs
    pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]  # a pair equal in several band sets counts once
    return pairs // n, pairs % n


def _neighbours(phashes: Sequence[str], max_distance: int) -> tuple[np.ndarray, dict[int, list[tuple[int, int]]]]:
    """For each record, the index of its hash among the unique hashes; each unique hash's close ones."""
    unique, inverse = np.unique(hashes_to_uint64(phashes), return_inverse=True)
    first, second, distance = near_pairs(unique, max_distance)
    close: dict[int, list[tuple[int, int]]] = {}
    for a, b, d in zip(first.tolist(), second.tolist(), distance.tolist(), strict=True):
        close.setdefault(a, []).append((b, d))
        close.setdefault(b, []).append((a, d))
    return inverse, close


class _FlatColours:
    """Kept flat images by mean colour; another flat image within `FLAT_COLOUR_TOLERANCE` levels
    (on every channel) of one of them is its near duplicate."""

    def __init__(self) -> None:
        self.colours: list[tuple[int, int, int]] = []
        self.keys: list[str] = []
        self.uris: list[str] = []

    def nearest(self, key: str) -> tuple[int, str, str] | None:
        if not self.colours:
            return None
        distance = np.abs(np.array(self.colours) - np.array(flat_colour(key))).max(axis=1)
        best = int(np.argmin(distance))  # kept in URI order: ties go to the smaller URI
        return (int(distance[best]), self.uris[best], self.keys[best]) if distance[best] <= FLAT_COLOUR_TOLERANCE else None

    def add(self, key: str, uri: str) -> None:
        self.colours.append(flat_colour(key))
        self.keys.append(key)
        self.uris.append(uri)


def dedup_columns(
    uris: Sequence[str],
    sha256s: Sequence[str],
    phashes: Sequence[str],
    *,
    exact: bool = True,
    max_distance: int | None = 6,
) -> DedupResult:
    """`dedup` over three parallel columns (an empty pHash: the image is only checked for exact copies)."""
    order = sorted(range(len(uris)), key=uris.__getitem__)
    with_hash = [i for i in order if phashes[i] and not is_flat(phashes[i])] if max_distance is not None else []
    slot = {record: position for position, record in enumerate(with_hash)}
    inverse, close = _neighbours([phashes[i] for i in with_hash], max_distance or 0)
    kept_for_hash: dict[int, str] = {}  # unique hash -> the first kept URI that has it
    kept_for_sha: dict[str, str] = {}
    flat = _FlatColours()
    result = DedupResult()
    for record in order:
        uri, sha, phash = uris[record], sha256s[record], phashes[record]
        if exact and sha in kept_for_sha:
            result.dropped[uri] = f"exact duplicate of {kept_for_sha[sha]} (same sha256)"
            continue
        if max_distance is not None and is_flat(phash):
            same_colour = flat.nearest(phash)
            if same_colour is not None:
                levels, kept_uri, kept_key = same_colour
                result.dropped[uri] = (
                    f"near duplicate of {kept_uri} (both flat images, colours #{phash[5:]} and #{kept_key[5:]} "
                    f"{levels} levels apart; pHash is not compared where an image has no detail)"
                )
                continue
            flat.add(phash, uri)
        position = slot.get(record)
        if position is not None:
            own = int(inverse[position])
            candidates = [(0, kept_for_hash[own])] if own in kept_for_hash else []
            candidates += [(d, kept_for_hash[other]) for other, d in close.get(own, ()) if other in kept_for_hash]
            if candidates:
                distance, near = min(candidates)
                result.dropped[uri] = f"near duplicate of {near} (phash distance {distance})"
                continue
            kept_for_hash.setdefault(own, uri)
        kept_for_sha.setdefault(sha, uri)
        result.kept.append(uri)
    return result


def dedup(records: Iterable[Mapping[str, Any]], exact: bool = True, max_distance: int | None = 6) -> DedupResult:
    """Drop exact (sha256) and near (pHash distance) duplicates, keeping the first by URI order.

    `records` need `uri`, `sha256` and `phash` (decoded rows; an empty `phash` is never compared).
    """
    rows = list(records)
    return dedup_columns(
        [str(r["uri"]) for r in rows],
        [str(r["sha256"]) for r in rows],
        [str(r["phash"] or "") for r in rows],
        exact=exact,
        max_distance=max_distance,
    )
