"""The fetch+decode benchmark (bench/fetch_decode_bench.py) at a tiny size: its own moto S3 process, 40 images.

CI keeps the bench runnable and its figures consistent; the real numbers come from the bench itself.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))

import fetch_decode_bench  # noqa: E402


def test_fetch_decode_bench_fetches_and_decodes_every_image():
    result = fetch_decode_bench.bench(40, concurrency=8, batch=16, rounds=1)
    assert result["images"] == result["fetched"] == result["decoded"] == 40
    assert result["mean_kib"] > 30  # web-size images, not thumbnails
    stages = result["stages"]
    assert set(stages) == {"fetch_threads", "fetch_bulk", "decode", "fetch_decode"}
    for figures in stages.values():
        assert figures["wall_s"] > 0 and figures["images_per_s"] > 0
        assert figures["per_core_machine"] == figures["images_per_s"] / result["cores"]
        assert figures["per_cpu_s_with_server"] <= figures["per_client_cpu_s"]
        assert figures["client_cpu_s"] > 0 and not math.isnan(figures["server_cpu_s"])  # the server is its own process
    assert stages["fetch_threads"]["server_cpu_s"] > 0
    assert result["vs_img2dataset_machine"] == result["per_core_machine"] / 100
    assert result["vs_img2dataset_client"] == result["per_client_cpu_s"] / 100
    assert 0 < result["signing_ms"] < 10 and set(result["decode_steps_ms"]) >= {"open_draft_load", "resize", "encode", "phash"}

    text = fetch_decode_bench.report(result)
    assert "img2dataset" in text and "per client CPU-second" in text and "s3fs bulk" in text
