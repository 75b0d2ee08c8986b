"""Input split into shards that Ray workers read in parallel, with the row numbers and duplicate ids
that reading the file top to bottom would give.

A JSON Lines file is cut into byte ranges (`plan_shards`). A shard owns every line that starts
inside its range (the Hadoop text-input rule), so each line belongs to exactly one shard wherever the
cuts fall. Two passes, both on workers:

    scan_shard   per shard: its non-blank line count and, per keyed line, a 128-bit hash of its key
    find_repeats one task over all scans: each shard's first row index, the total, and every row whose
                 key an earlier row already used -> that earlier row's index ("first use wins")

then `shard_lines` yields each shard's non-blank lines with their row index (the position among the
file's non-blank lines, as the sequential reader counts them). A Parquet file is one shard, read in
order (its keys are checked as it goes).

Lines are what Python's text mode reads (`\\n`, `\\r\\n` and a lone `\\r` end a line) and a line
is blank when `str.strip` leaves nothing: the sequential reader's rules exactly. A line that is not
UTF-8 is given as None (its reader makes it a row error) instead of failing the whole shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.io.storage import Location

SHARD_BYTES = 32 << 20


@dataclass(frozen=True)
class Shard:
    """One byte range of one file (`end` None: to the end)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    start: int = 0
    end: int | None = None

    @property
    def location(self) -> Location:
        return Location(self.url, self.storage_options)


@dataclass
class ShardScan:
    """What `scan_shard` found: non-blank lines, and the key hashes of keyed lines (by line position)."""

    rows: int
    positions: np.ndarray  # int64: the keyed lines' positions among the shard's non-blank lines
    hashes: np.ndarray  # uint64 (n, 2)


@dataclass
class Repeats:
    """`find_repeats`' answer: each shard's first row index, the total, and the repeated rows."""

    first_indexes: list[int]
    total: int
    earlier: dict[int, int]  # row index -> index of the earlier row with the same key


def plan_shards(source: Location, shard_bytes: int = SHARD_BYTES) -> list[Shard]:
    """Byte ranges of about `shard_bytes` covering the file (at least one)."""
    size = source.size()
    shard_bytes = max(1, shard_bytes)
    starts = list(range(0, max(size, 1), shard_bytes))
    return [
        Shard(source.url, source.storage_options, start, start + shard_bytes if start + shard_bytes < size else None)
        for start in starts
    ]


def shard_lines(shard: Shard, first_index: int = 0) -> Iterator[tuple[int, str | None]]:
    """The shard's non-blank lines as (row index, text); text None: the line is not UTF-8."""
    index = first_index
    for raw in _raw_lines(shard):
        for text in _text_lines(raw):
            if text is None or text.strip():
                yield index, text
                index += 1


def scan_shard(shard: Shard, key_of: Callable[[str], str | None]) -> ShardScan:
    """Count the shard's non-blank lines and hash each keyed line's key (`key_of`: None when unkeyed)."""
    positions: list[int] = []
    digests: list[bytes] = []
    rows = 0
    for position, text in shard_lines(shard):
        rows = position + 1
        key = key_of(text) if text is not None else None
        if key is not None:
            positions.append(position)
            digests.append(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    hashes = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2) if digests else np.zeros((0, 2), np.uint64)
    return ShardScan(rows, np.asarray(positions, dtype=np.int64), hashes)


def find_repeats(scans: Sequence[ShardScan]) -> Repeats:
    """Row indexes from the shards' counts; every keyed row whose key an earlier row used -> that row."""
    first_indexes = np.concatenate([[0], np.cumsum([s.rows for s in scans])]).astype(np.int64)
    if not any(len(s.positions) for s in scans):
        return Repeats([int(i) for i in first_indexes[:-1]], int(first_indexes[-1]), {})
    indexes = np.concatenate([s.positions + first for s, first in zip(scans, first_indexes[:-1], strict=False)])
    hashes = np.concatenate([s.hashes for s in scans])
    order = np.lexsort((indexes, hashes[:, 1], hashes[:, 0]))
    ordered_hashes, ordered_indexes = hashes[order], indexes[order]
    same = np.all(ordered_hashes[1:] == ordered_hashes[:-1], axis=1)
    starts = np.concatenate([[True], ~same])
    group_first = ordered_indexes[starts][np.cumsum(starts) - 1]
    repeated = ~starts
    earlier = dict(zip(ordered_indexes[repeated].tolist(), group_first[repeated].tolist(), strict=False))
    return Repeats([int(i) for i in first_indexes[:-1]], int(first_indexes[-1]), earlier)


def _raw_lines(shard: Shard) -> Iterator[bytes]:
    """The lines (bytes, ending at `\\n`) that start inside the shard's range."""
    with shard.location.open("rb") as handle:
        if shard.start > 0:
            handle.seek(shard.start - 1)
            handle.readline()  # the end of the line that started before the range (or its newline)
        position = handle.tell()
        while shard.end is None or position < shard.end:
            raw = handle.readline()
            if not raw:
                return
            yield raw
            position += len(raw)


def _text_lines(raw: bytes) -> Sequence[str | None]:
    """One `\\n`-ended byte line as text mode reads it: a lone `\\r` ends a line too."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return [None]
    if "\r" not in text:
        return [text]
    pieces = text.replace("\r\n", "\n").split("\r")
    return [piece for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
