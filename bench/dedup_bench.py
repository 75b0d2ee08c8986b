"""Dedup at scale: our multi-index pHash search against a vectorised all-pairs scan, in one run.

    .venv/bin/python bench/dedup_bench.py                     # 10k, 100k, 1M records
    .venv/bin/python bench/dedup_bench.py --sizes 10000 200000 --scan-up-to 100000

Each corpus is 90% distinct images and 10% in clusters of five: copies at most 3 pHash bits from
their cluster's centre (so within 6 of each other: near duplicates at the default distance), a
fifth of them byte-identical (exact duplicates). Every run checks that every duplicate is found
(one image kept per cluster, every distinct image kept).

The peer is the plain greedy definition done the fast obvious way: for each image in URI order,
one vectorised numpy popcount against every kept hash (what "a vectorised scan" means in issue 14;
quadratic, so it only runs up to `--scan-up-to`). Both are timed in this process, one after the
other, and the ratio printed. Results go to bench/results/dedup-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "rayllm_stages" / "curation"))

from test_dedup import planted_corpus  # noqa: E402  (the same corpus the tests use)

from prefect_rayllm.rayllm_stages.curation.dedup import dedup_columns, hashes_to_uint64  # noqa: E402


def vectorised_scan(uris: list[str], shas: list[str], phashes: list[str], max_distance: int = 6) -> int:
    """Greedy dedup with one numpy popcount per image against all kept hashes; returns kept count."""
    order = sorted(range(len(uris)), key=uris.__getitem__)
    values = hashes_to_uint64(phashes)
    kept = np.zeros(len(uris), dtype=np.uint64)
    kept_count, kept_sha = 0, set()
    for i in order:
        if shas[i] in kept_sha:
            continue
        if kept_count and (np.bitwise_count(kept[:kept_count] ^ values[i]) <= max_distance).any():
            continue
        kept[kept_count] = values[i]
        kept_count += 1
        kept_sha.add(shas[i])
    return kept_count


def corpus(size: int) -> tuple[list[str], list[str], list[str], int]:
    """90% distinct images, 10% in clusters of five; returns the columns and how many are kept."""
    rng = random.Random(size)
    clusters = size // 50
    singles = planted_corpus(rng, size - 5 * clusters, 1, 0, 0.0, no_hash_share=0.0)
    grouped = planted_corpus(rng, clusters, 5, 3, 0.2, no_hash_share=0.0)
    uris, shas, phashes = singles[0] + grouped[0], singles[1] + ["g" + sha for sha in grouped[1]], singles[2] + grouped[2]
    return uris, shas, phashes, size - 5 * clusters + clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--scan-up-to", type=int, default=100_000, help="largest size the all-pairs scan runs at")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        uris, shas, phashes, expected_kept = corpus(size)
        start = time.perf_counter()
        result = dedup_columns(uris, shas, phashes, max_distance=6)
        ours = time.perf_counter() - start
        # Every planted duplicate is dropped; at a million, a few distinct random hashes also fall
        # within 6 bits of each other by chance (about 2 pairs expected), so allow those.
        chance = expected_kept - len(result.kept)
        assert 0 <= chance <= max(3, size // 200_000), f"{chance} duplicates missed or too many found"
        scan = None
        if size <= args.scan_up_to:
            start = time.perf_counter()
            assert vectorised_scan(uris, shas, phashes) == len(result.kept)
            scan = time.perf_counter() - start
        rows.append({"records": size, "ours_s": round(ours, 2), "scan_s": None if scan is None else round(scan, 2)})
        ratio = f"{scan / ours:.1f}x faster" if scan else "scan not run"
        print(
            f"{size:>9,} records: ours {ours:6.2f} s | vectorised scan {'-' if scan is None else f'{scan:.2f} s'} | {ratio}",
            flush=True,
        )
    load = os.getloadavg()[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}")
    out = REPO / "bench" / "results" / f"dedup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "cores": os.cpu_count(), "load_average": load}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
