"""Image curation end to end through the CLI: a corpus of good, broken and duplicate images on a
real S3 server (moto, loopback), behind a proxy that fails some GETs, through fetch, decode, the
tiny VLM, rules and dedup. Every image ends curated or rejected with the expected reason."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

BUCKET = "curation-test"


@pytest.mark.slow
def test_cli_curates_a_corpus_from_s3(tmp_path, prefect_server, ray_session, local_s3, tiny_vlm):
    import pyarrow.parquet as pq

    from rayllm_stages.image_corpus import build_corpus

    local_s3.create_bucket(BUCKET)
    corpus = build_corpus(f"s3://{BUCKET}/corpus", local_s3.storage_options)
    config = {
        "source": {"manifest": corpus.manifest_url, "storage_options": local_s3.storage_options},
        "output": str(tmp_path / "out"),
        "model": {"source": str(tiny_vlm), "engine_kwargs": {"max_model_len": 512, "dtype": "float32"}, "batch_size": 8},
        "fetch": {"max_attempts": 5, "backoff_base_s": 0.01},
        "filter": {"min_width": 32, "min_height": 32, "phash_max_distance": 6},
    }
    config_path = tmp_path / "curate.yaml"
    config_path.write_text(yaml.safe_dump(config))

    outcome = CliRunner().invoke(app, ["curate", str(config_path), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    curated = pq.read_table(tmp_path / "out" / "curated.parquet").to_pylist()
    rejected = {r["uri"]: r for r in pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()}
    assert manifest["input"] == len(corpus.expected) == len(curated) + len(rejected)
    kept = {r["uri"]: r for r in curated}
    for uri, expected in corpus.expected.items():
        if expected.outcome == "kept":
            assert uri in kept, (uri, rejected.get(uri))
            row = kept[uri]
            assert json.loads(row["scores"])["quality"] in (1, 2, 3, 4, 5) and row["model"] == "tiny-vlm"
            if expected.upright_size:
                assert (row["width"], row["height"]) == tuple(expected.upright_size), uri
        else:
            stage = {"fetch_error": "fetch", "decode_error": "decode", "duplicate": "dedup"}[expected.outcome]
            assert rejected[uri]["stage"] == stage, rejected[uri]
            assert expected.reason.lower() in rejected[uri]["reason"].lower(), rejected[uri]
    assert manifest["rejected_by_stage"]["dedup"] == 2
