"""Image curation end to end: a corpus of good, broken and duplicate images on a real S3 server
(moto, loopback) read through our S3 proxy, through fetch, decode, the tiny VLM, rules and dedup.

Faults are injected by the proxy only (`S3Proxy(fault_rate=...)`: 503 SlowDown and TCP resets on
object GETs). Every image ends curated or rejected with the expected reason, every injected
transient failure is retried to success, the Prefect artifacts (progress, per-stage table,
report with the contact sheet) are read back from the real Prefect server, and a run killed with
SIGKILL resumes without computing an image twice.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app

BUCKET = "curation-test"


def _through(endpoint_url: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint_url}}


def _model(tiny_vlm, batch_size: int = 8) -> dict:
    return {"source": str(tiny_vlm), "engine_kwargs": {"max_model_len": 512, "dtype": "float32"}, "batch_size": batch_size}


@pytest.mark.slow
def test_cli_curates_a_corpus_from_s3_through_a_faulty_proxy(tmp_path, prefect_server, ray_session, local_s3, tiny_vlm):
    import pyarrow.parquet as pq
    from PIL import Image
    from prefect_api import artifacts_with_key, wait_for_event

    from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus
    from prefect_rayllm.rayllm_stages.testing.s3_proxy import S3Proxy
    from prefect_rayllm.tasks.reporting import artifact_key

    local_s3.create_bucket(BUCKET)
    corpus = build_corpus(f"s3://{BUCKET}/corpus", local_s3.storage_options)
    output = str(tmp_path / "out")
    since = datetime.now(UTC) - timedelta(seconds=5)
    with S3Proxy(local_s3.endpoint_url, latency_s=0.005, fault_rate=0.2, seed=3) as proxy:
        options = _through(proxy.endpoint_url)
        config = {
            "source": {"manifest": corpus.manifest_url, "storage_options": options},
            "output": output,
            "model": _model(tiny_vlm),
            "fetch": {"max_attempts": 10, "backoff_base_s": 0.01, "backoff_max_s": 0.1, "timeout_s": 10},
            "filter": {"min_width": 32, "min_height": 32, "phash_max_distance": 6},
            "commit_every_rows": 4,
        }
        config_path = tmp_path / "curate.yaml"
        config_path.write_text(yaml.safe_dump(config))
        outcome = CliRunner().invoke(app, ["curate", str(config_path), "--no-progress"])
        faults = dict(proxy.stats.faults)
    assert outcome.exit_code == 0, outcome.output
    assert faults["slowdown"] > 0 and faults["reset"] > 0, faults

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "curation"
    section = manifest["curation"]
    curated = pq.read_table(out / "curated.parquet").to_pylist()
    rejected = {r["uri"]: r for r in pq.read_table(out / "rejected.parquet").to_pylist()}
    # Nothing lost: every input image is curated or rejected (fetch/decode/caption errors included), once.
    assert manifest["counts"]["total"] == len(corpus.expected) == len(curated) + len(rejected)
    assert (manifest["counts"]["completed"], manifest["counts"]["failed"]) == (len(curated), len(rejected))
    assert len({r["uri"] for r in curated} | set(rejected)) == len(corpus.expected)
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
            if stage in ("fetch", "decode"):
                assert uri in rejected[uri]["reason"]  # the error names its object
    assert section["rejected_by_stage"]["dedup"] == 2

    # Every transient failure was retried to success: the only fetch rejection is the missing key
    # (a permanent error), no image was given up on, and the retries show per image. A reset on a
    # reused keep-alive connection may be resent by aiohttp itself (see image_fetch), and the
    # contact sheet reads a sample again, so retries are at most the faults injected.
    fetch = section["fetch"]
    assert [r["stage"] for r in rejected.values()].count("fetch") == 1
    assert "FileNotFoundError" in next(r["reason"] for r in rejected.values() if r["stage"] == "fetch")
    assert fetch["gave_up_images"] == 0 and 0 < fetch["retries"] <= faults["slowdown"] + faults["reset"], (fetch, faults)
    retried = [r for r in curated if r["fetch_attempts"] > 1] + [r for r in rejected.values() if r["fetch_attempts"] > 1]
    assert len(retried) == fetch["retried_images"] > 0

    # The contact sheet: a PNG next to the outputs, and inline in the report artifact.
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.width >= 6 * 96
    shown = section["contact_sheet"]
    assert len(shown["kept"]) == 8 and len(shown["rejected"]) == 8  # all 8 kept, 8 of the 8 rejected
    report = artifacts_with_key(artifact_key("curation-report", output))[0]
    assert report.type == "markdown" and "| dedup | 10 | 8 | 2 |" in report.data
    inline = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", report.data)
    assert inline and Image.open(io.BytesIO(base64.b64decode(inline.group(1)))).size == sheet.size
    stages = {row["stage"]: row for row in json.loads(artifacts_with_key(artifact_key("curation-stages", output))[0].data)}
    assert stages["fetch"]["rejected"] == 1 and "FileNotFoundError: 1" in stages["fetch"]["rejected because"]
    assert stages["decode"]["rejected"] == 5 and "empty file: 1" in stages["decode"]["rejected because"]
    assert stages["curated"]["passed"] == 8
    progress = artifacts_with_key(artifact_key("curation-progress", output))
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    event = wait_for_event("rayllm.curation.completed", f"rayllm.curation.{output}", since=since)
    assert event.payload["curated"] == 8


def _cli(config_path: Path, api_url: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "curate", str(config_path), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _parts(output: Path) -> list[Path]:
    return sorted((output / "_rayllm" / "parts").glob("*.part"))


def _committed(output: Path) -> int:
    return sum(len(json.loads(p.open().readline()[len("#rayllm-part ") :])["indexes"]) for p in _parts(output))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_computes_only_the_rest(tmp_path, prefect_server, ray_session, local_s3, tiny_vlm):
    """A run killed with SIGKILL after some records were committed; the rerun fetches and
    captions only the other images, the outputs hold each image once, and the dead run's Ray is
    reaped. Then: a filter change re-filters without the model; a prompt change is refused."""
    from prefect_rayllm.flows.curation import curate_images
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
    from prefect_rayllm.rayllm_stages.curation.run import CurationJob
    from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
    from prefect_rayllm.rayllm_stages.testing.image_corpus import encode, pattern_image
    from prefect_rayllm.rayllm_stages.testing.s3_proxy import S3Proxy

    images = 48
    fs = local_s3.filesystem()
    local_s3.create_bucket(BUCKET)
    fs.pipe(
        {
            f"{BUCKET}/resume/img-{i:03d}.png": encode(pattern_image("shapes", (96, 72), seed=100 + i), "PNG")
            for i in range(images)
        }
    )
    output = tmp_path / "out"
    base = {
        "source": {"url": f"s3://{BUCKET}/resume/"},
        "output": str(output),
        "model": _model(tiny_vlm, batch_size=4),
        "filter": {"min_width": 32, "min_height": 32, "phash_max_distance": None},
        "commit_every_rows": 4,
        "contact_sheet_images": 4,
    }

    # The first run's S3 stalls every GET from the 25th image on (the proxy's injected "stall"
    # fault), so it is still running, with some records committed, when it is killed.
    def held(path: str) -> bool:
        return "/resume/img-" in path and int(path.rsplit("-", 1)[1][:3]) >= images // 2

    with S3Proxy(local_s3.endpoint_url, latency_s=0.005, stall_gets=held) as stalling:
        first_config = {
            **base,
            "source": {**base["source"], "storage_options": _through(stalling.endpoint_url)},
            "fetch": {"max_concurrency": 1, "timeout_s": 900},
            "fetch_workers": 1,
        }
        config_path = tmp_path / "curate.yaml"
        config_path.write_text(yaml.safe_dump(first_config))
        first = _cli(config_path, prefect_server)
        deadline = time.time() + 600
        while len(_parts(output)) < 2:
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "no record committed in 600 s"
            time.sleep(0.2)
        session_dir = json.loads((ray_runtime.REGISTRY / f"{first.pid}.json").read_text())["session_dir"]
        left_behind = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
        first.wait()
        assert stalling.stats.stalled >= 1
    done_before = _committed(output)
    assert 0 < done_before <= images // 2, done_before
    assert ray_runtime.reap_orphaned_local_clusters() >= 1
    assert not ray_runtime.session_processes(session_dir), "the dead driver's Ray cluster is still running"
    # The command's watchdog (runtime.supervision) outlives the driver while it stops what it started:
    # everything the dead driver left is gone within the watchdog's bar of 10 s.
    _, alive = psutil.wait_procs(left_behind, timeout=10)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive

    # The rerun may read faster: fetch settings are not part of what a record depends on.
    with S3Proxy(local_s3.endpoint_url, latency_s=0.005) as fast:
        config = CurationConfig.model_validate(
            {**base, "source": {**base["source"], "storage_options": _through(fast.endpoint_url)}}
        )
        manifest = curate_images(config=config)
        gets = fast.stats.object_gets
    counts, section = manifest.counts, manifest.curation
    assert counts.total == images == counts.completed + counts.failed
    assert section.computed_now == images - done_before and section.reused_records == done_before
    assert [a["rows"] for a in manifest.attempts][-1] == images - done_before
    assert sum(a["rows"] for a in manifest.attempts) == images  # no image computed twice
    # Only the images without a record were fetched (plus the contact sheet's re-reads).
    assert images - done_before <= gets <= images - done_before + config.contact_sheet_images
    import pyarrow.parquet as pq

    uris = [r["uri"] for r in pq.read_table(output / "curated.parquet").to_pylist()]
    uris += [r["uri"] for r in pq.read_table(output / "rejected.parquet").to_pylist()]
    assert sorted(uris) == sorted(set(uris)) and len(uris) == images

    # Changing only the rules re-filters the stored records; the model is not called.
    strict = config.model_copy(update={"filter": config.filter.model_copy(update={"min_width": 200})})
    refiltered = CurationJob(strict).run()
    assert refiltered.curation.computed_now == 0 and refiltered.counts.completed == 0
    assert refiltered.curation.rejected_by_stage["filter"] == images - counts.failed
    # Changing what a record depends on is refused, naming the change, unless overwrite.
    with pytest.raises(ResumeRefused, match="prompt"):
        CurationJob(config.model_copy(update={"prompt": "Rate it."})).prepare()


def test_example_config_lists_the_corpus_made_by_the_cli(tmp_path, monkeypatch):
    """examples/curate-cpu.yaml is valid and, after `rayllm make-image-corpus`, finds its images."""
    from prefect_rayllm.rayllm_stages.config.base import load_config
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
    from prefect_rayllm.rayllm_stages.curation.run import CurationJob

    monkeypatch.chdir(tmp_path)
    config = load_config(CurationConfig, REPO / "examples" / "curate-cpu.yaml")
    folder = config.source.url.removesuffix("/").removesuffix("/images")
    outcome = CliRunner().invoke(app, ["make-image-corpus", folder])
    assert outcome.exit_code == 0, outcome.output
    run = CurationJob(config)
    assert len(run.uris()) == 15
    preparation = run.prepare()
    assert preparation.total_rows == 15 and preparation.done_rows == 0 and not preparation.already_complete
    assert (tmp_path / config.output / "_rayllm" / "job.json").exists()


def test_a_failed_curation_emits_its_event(tmp_path, prefect_server, ray_session):
    from prefect_api import wait_for_event

    from prefect_rayllm.flows.curation import curate_images
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig

    output = tmp_path / "out"
    config = CurationConfig.model_validate(
        {
            "source": {"manifest": str(tmp_path / "no-such-manifest.txt")},
            "output": str(output),
            "model": {"source": "m"},
        }
    )
    with pytest.raises(Exception):
        curate_images(config=config)
    event = wait_for_event("rayllm.curation.failed", f"rayllm.curation.{output}")
    assert "no-such-manifest.txt" in event.payload["reason"]
