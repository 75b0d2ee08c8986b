"""Evaluation's Prefect layer: plot images the Prefect UI can open."""

from __future__ import annotations

import urllib.request

from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.tasks.evaluation import _browser_url


def _config(output: str, **extra) -> EvaluationConfig:
    return EvaluationConfig.model_validate(
        {
            "name": "e",
            "dataset": {"path": "eval.jsonl"},
            "output": output,
            "targets": [{"name": "t", "model": {"source": "m"}}],
            "metrics": [{"type": "exact_match"}],
            **extra,
        }
    )


def test_plot_links_a_browser_can_open(tmp_path, local_s3):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    local_s3.filesystem().mkdir("plots")
    local_s3.filesystem().pipe("plots/e/scores.png", b"\x89PNG fake")
    on_s3 = _config("s3://plots/e", storage_options=local_s3.storage_options)
    signed = _browser_url(on_s3, "s3://plots/e/scores.png")
    assert signed is not None and signed.startswith(local_s3.endpoint_url) and "Signature" in signed
    assert urllib.request.urlopen(signed, timeout=10).read() == b"\x89PNG fake"
    local = _config(str(tmp_path))
    assert _browser_url(local, str(tmp_path / "scores.png")) is None  # the report embeds it instead
    assert _browser_url(local, "https://example.org/p.png") == "https://example.org/p.png"
