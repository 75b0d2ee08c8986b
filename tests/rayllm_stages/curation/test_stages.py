"""Image curation building blocks: source, fetch, decode, filter/dedup, corpus and the S3 proxy.

Real parts throughout: moto's S3 server over HTTP on loopback, our proxy in front of it, s3fs,
Pillow. The one fake is `InjectedAccessDeniedFS`, an injected fault (moto does not enforce ACLs).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from prefect_rayllm.rayllm_stages.curation.decode import (
    DecodeConfig,
    DecodeError,
    DecodeImages,
    decode_image,
    image_message,
)
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig, FetchImages
from prefect_rayllm.rayllm_stages.curation.filters import FilterConfig, dedup, rule_rejections
from prefect_rayllm.rayllm_stages.curation.source import ImageSourceConfig, iter_image_uris
from prefect_rayllm.rayllm_stages.testing.image_corpus import (
    MISSING_NAME,
    bomb_png,
    build_corpus,
    corpus_files,
    encode,
    pattern_image,
)
from prefect_rayllm.rayllm_stages.testing.s3_proxy import S3Proxy


def through(endpoint_url: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint_url}}


def rows_of(batch: dict[str, np.ndarray]) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["uri"]))]


def in_batches(udf, uris: list[str], size: int) -> list[dict]:
    rows = []
    for start in range(0, len(uris), size):
        rows.extend(rows_of(udf({"uri": np.array(uris[start : start + size], dtype=object)})))
    return rows


@pytest.fixture(scope="module")
def corpus(local_s3):
    local_s3.create_bucket("curation")
    return build_corpus("s3://curation/corpus", local_s3.storage_options)


def test_corpus_survives_faulty_s3_and_ends_as_expected(local_s3, corpus):
    uris = list(iter_image_uris(ImageSourceConfig(manifest=corpus.manifest_url, storage_options=local_s3.storage_options)))
    assert uris == sorted(corpus.expected) and len(uris) == 16

    with S3Proxy(local_s3.endpoint_url, latency_s=0.02, fault_rate=0.2, seed=7) as proxy:
        fetch = FetchImages(
            FetchConfig(
                storage_options=through(proxy.endpoint_url),
                max_concurrency=8,
                max_attempts=10,
                backoff_base_s=0.01,
                backoff_max_s=0.1,
            ),
            seed=0,
        )
        fetched = in_batches(fetch, uris, size=6)
    injected = proxy.stats.faults
    assert injected["slowdown"] > 0 and injected["reset"] > 0, injected

    # Every object that exists arrived intact despite the faults; retries show in fetch_attempts.
    files, _ = corpus_files()
    for row in fetched:
        name = row["uri"].rsplit("/", 1)[-1]
        if name == MISSING_NAME:
            assert MISSING_NAME in row["fetch_error"] and "FileNotFoundError" in row["fetch_error"]
            assert row["image_bytes"] == b""
        else:
            assert row["fetch_error"] == "", row["fetch_error"]
            assert hashlib.sha256(row["image_bytes"]).digest() == hashlib.sha256(files[name]).digest(), name
    # Each SlowDown costs one of our attempts; a reset on a reused keep-alive connection may be
    # retried once inside aiohttp first (see image_fetch), so resets cost at most one attempt.
    retries = sum(r["fetch_attempts"] - 1 for r in fetched)
    assert injected["slowdown"] <= retries <= injected["slowdown"] + injected["reset"]
    assert any(r["fetch_attempts"] > 1 for r in fetched)

    batch = {k: np.array([r[k] for r in fetched], dtype=object if k != "fetch_attempts" else np.int64) for k in fetched[0]}
    decoded = rows_of(DecodeImages(DecodeConfig(max_edge=128))(batch))
    pa.table(DecodeImages(DecodeConfig(max_edge=128))(batch))  # columns convert to an Arrow block, as in Ray Data
    assert "image_bytes" not in decoded[0]

    good = [r for r in decoded if not r["fetch_error"] and not r["decode_error"]]
    result = dedup(good, FilterConfig(phash_max_distance=6))
    outcome = {}
    for row in decoded:
        uri = row["uri"]
        if row["fetch_error"]:
            outcome[uri] = ("fetch_error", row["fetch_error"])
        elif row["decode_error"]:
            outcome[uri] = ("decode_error", row["decode_error"])
        elif uri in result.dropped:
            outcome[uri] = ("duplicate", result.dropped[uri])
        else:
            outcome[uri] = ("kept", "")
    for uri, expected in corpus.expected.items():
        kind, reason = outcome[uri]
        assert kind == expected.outcome, (uri, reason)
        assert expected.reason in reason, (uri, reason)
        assert uri in reason or kind in ("kept", "duplicate")  # errors name their object
        if expected.duplicate_of:
            assert expected.duplicate_of in reason
    assert len(result.kept) + len(result.dropped) + sum(k != "kept" and k != "duplicate" for k, _ in outcome.values()) == len(
        uris
    )

    by_uri = {r["uri"]: r for r in decoded}
    for uri in corpus.uris("kept"):
        row = by_uri[uri]
        assert (row["width"], row["height"]) == corpus.expected[uri].upright_size, uri
        normalised = Image.open(io.BytesIO(row["image"]))
        assert normalised.format == "PNG" and normalised.mode == "RGB"
        assert normalised.size == (row["norm_width"], row["norm_height"]) and max(normalised.size) <= 128
        assert len(row["phash"]) == 16 and len(row["sha256"]) == 64 and row["byte_size"] > 0

    def named(name: str) -> dict:
        return next(r for r in decoded if r["uri"].endswith("/" + name))

    rotated = named("h-exif-rotated.jpg")
    stored = Image.open(io.BytesIO(files["h-exif-rotated.jpg"])).size
    assert stored == (300, 200) and rotated["orientation"] == 6
    assert (rotated["norm_width"], rotated["norm_height"]) == (85, 128)  # upright: portrait
    assert named("g-animated.gif")["frames"] == 3
    assert named("e-cmyk.jpg")["format"] == "JPEG"
    gray16 = np.asarray(Image.open(io.BytesIO(named("f-gray16.png")["image"])))
    assert gray16[:, 0].mean() < 10 and gray16[:, -1].mean() > 245  # rescaled, not clipped to white
    assert len(files["m-bad-bomb.png"]) < 1024


def test_permanent_errors_are_not_retried_and_transient_ones_give_up(local_s3, corpus):
    missing = corpus.images_url.rstrip("/") + "/" + MISSING_NAME
    present = corpus.uris("kept")[0]
    row = rows_of(FetchImages({"storage_options": local_s3.storage_options})({"uri": np.array([missing])}))[0]
    assert row["fetch_attempts"] == 1 and missing in row["fetch_error"]

    class InjectedAccessDeniedFS:
        """Injected fault: moto does not enforce access control, so AccessDenied is simulated."""

        def _strip_protocol(self, uri: str) -> str:
            return uri

        def cat_file(self, path: str) -> bytes:
            raise PermissionError(f"Access Denied: {path}")

    class DeniedFetch(FetchImages):
        def filesystem(self, uri: str):
            return InjectedAccessDeniedFS()

    denied = rows_of(DeniedFetch()({"uri": np.array([present])}))[0]
    assert denied["fetch_attempts"] == 1 and "PermissionError" in denied["fetch_error"] and present in denied["fetch_error"]

    for kind in ("slowdown", "reset"):
        with S3Proxy(local_s3.endpoint_url, fault_rate=1.0, fault_kinds=(kind,), seed=0) as proxy:
            fetch = FetchImages(
                FetchConfig(
                    storage_options=through(proxy.endpoint_url),
                    max_attempts=3,
                    backoff_base_s=0.001,
                    backoff_max_s=0.01,
                    timeout_s=5,
                )
            )
            row = rows_of(fetch({"uri": np.array([present])}))[0]
        assert row["fetch_attempts"] == 3 and "gave up after 3 attempts" in row["fetch_error"], row["fetch_error"]
        # One GET per attempt (s3fs and botocore retries are off); aiohttp alone may resend a GET
        # once when a reused keep-alive connection was reset.
        assert proxy.stats.object_gets == 3 if kind == "slowdown" else 3 <= proxy.stats.object_gets <= 6
        assert proxy.stats.requests == proxy.stats.object_gets  # no HEAD before a GET


def test_each_object_costs_one_request(local_s3, corpus):
    """s3fs sends a HEAD before every `cat_file` GET unless its max_concurrency is 1; the fetch stage sets it."""
    uris = corpus.uris("kept")[:5]
    with S3Proxy(local_s3.endpoint_url) as proxy:
        rows = in_batches(FetchImages(FetchConfig(storage_options=through(proxy.endpoint_url))), uris, 5)
    assert [r["fetch_error"] for r in rows] == [""] * 5 and all(r["fetch_attempts"] == 1 for r in rows)
    assert proxy.stats.requests == proxy.stats.object_gets == 5


def test_proxy_passes_requests_through_and_adds_latency(local_s3, corpus):
    import time

    direct = local_s3.filesystem()
    key = corpus.uris("kept")[0].removeprefix("s3://")
    with S3Proxy(local_s3.endpoint_url, latency_s=0.05) as proxy:
        import s3fs

        fs = s3fs.S3FileSystem(**through(proxy.endpoint_url), skip_instance_cache=True)
        assert fs.ls("curation/corpus/images") == direct.ls("curation/corpus/images", refresh=True)
        assert fs.info(key)["size"] == direct.info(key)["size"]
        fs.pipe("curation/proxy-put.bin", b"x" * 1000)
        started = time.perf_counter()
        assert fs.cat_file("curation/proxy-put.bin") == b"x" * 1000
        assert time.perf_counter() - started >= 0.05
    assert direct.cat_file("curation/proxy-put.bin") == b"x" * 1000


def test_source_lists_lazily_with_globs_and_limit(local_s3, corpus, tmp_path):
    opts = local_s3.storage_options
    everything = list(iter_image_uris(ImageSourceConfig(url="s3://curation/corpus/", storage_options=opts)))
    assert everything[-1].endswith("/manifest.jsonl") or everything[0].endswith("/manifest.jsonl")
    assert everything[0] == "s3://curation/corpus/manifest.jsonl"  # a folder's files, then its subfolders
    images = [u for u in everything if "/images/" in u]
    assert images == sorted(images) and len(images) == 15

    pngs = list(
        iter_image_uris(
            ImageSourceConfig(
                url="s3://curation/corpus/images", include=["*.png"], exclude=["*-bad-*", "y-*"], storage_options=opts
            )
        )
    )
    assert [u.rsplit("/", 1)[-1] for u in pngs] == ["a-shapes.png", "b-gradient.png", "f-gray16.png"]
    limited = iter_image_uris(ImageSourceConfig(url="s3://curation/corpus", include=["images/*"], limit=4, storage_options=opts))
    assert next(limited).endswith("/images/a-shapes.png") and len(list(limited)) == 3

    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    local = list(iter_image_uris(ImageSourceConfig(url=str(tmp_path))))
    assert local == [f"file://{tmp_path}/a.png", f"file://{tmp_path}/b.jpg", f"file://{tmp_path}/sub/c.jpg"]

    manifest = tmp_path / "list.txt"
    manifest.write_text('# images\ns3://b/one.jpg\n\n s3://b/two.png \n{"uri": "s3://b/three.jpg", "x": 1}\n')
    assert list(iter_image_uris(ImageSourceConfig(manifest=str(manifest), exclude=["*.png"]))) == [
        "s3://b/one.jpg",
        "s3://b/three.jpg",
    ]
    manifest.write_text('s3://b/one.jpg\n{"path": "s3://b/two.jpg"}\n')
    with pytest.raises(ValueError, match="line 2: no string 'uri'"):
        list(iter_image_uris(ImageSourceConfig(manifest=str(manifest))))
    for bad in ({}, {"url": "s3://a", "manifest": "s3://b"}, {"url": "s3://a", "limt": 3}):
        with pytest.raises(ValidationError):
            ImageSourceConfig.model_validate(bad)


def test_decode_limits_and_message():
    small = encode(pattern_image("rings", (320, 240)), "PNG")
    with pytest.raises(DecodeError, match="320x240 = 76800 pixels, over max_pixels 10000"):
        decode_image(small, DecodeConfig(max_pixels=10_000))
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(bomb_png(), DecodeConfig(max_pixels=10**12))  # Pillow's own header check
    with pytest.raises(DecodeError, match="decompression bomb: header declares 30000x3000 = 90000000 pixels"):
        decode_image(bomb_png(30000, 3000), DecodeConfig(max_pixels=10**6))
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    row = decode_image(encode(rgba, "PNG"), DecodeConfig(output_format="JPEG"))
    assert row["image_mime"] == "image/jpeg" and Image.open(io.BytesIO(row["image"])).getpixel((5, 5))[1] > 240

    message = image_message("Describe the image.", row["image"], row["image_mime"])
    part = message[0]["content"][0]
    assert message[0]["role"] == "user" and part["type"] == "image_url"
    header, payload = part["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64" and base64.b64decode(payload) == row["image"]
    assert message[0]["content"][1] == {"type": "text", "text": "Describe the image."}


def test_rules_and_dedup():
    config = FilterConfig(min_width=100, min_height=100, max_aspect_ratio=2.0, score_thresholds={"quality": 0.5})
    assert rule_rejections({"width": 80, "height": 200}, config).startswith("too small: 80x200")
    assert "above max_aspect_ratio 2.0" in rule_rejections({"width": 500, "height": 200}, config)
    assert rule_rejections({"width": 300, "height": 200, "scores": '{"quality": 0.9}'}, config) is None
    assert "score 'quality' = 0.2 below 0.5" in rule_rejections({"width": 300, "height": 200, "quality": 0.2}, config)
    assert "missing" in rule_rejections({"width": 300, "height": 200, "scores": {}}, config)
    with pytest.raises(ValidationError, match="min_aspect_ratio 3.0 is above"):
        FilterConfig(min_aspect_ratio=3.0, max_aspect_ratio=2.0)

    records = [
        {"uri": "s3://b/c", "sha256": "s2", "phash": "ffff000000000000"},
        {"uri": "s3://b/a", "sha256": "s1", "phash": "0000000000000000"},
        {"uri": "s3://b/b", "sha256": "s1", "phash": "0000000000000000"},
        {"uri": "s3://b/d", "sha256": "s3", "phash": "0000000000000007"},
    ]
    result = dedup(records, FilterConfig(phash_max_distance=3))
    assert result.kept == ["s3://b/a", "s3://b/c"]
    assert result.dropped == {
        "s3://b/b": "exact duplicate of s3://b/a (same sha256)",
        "s3://b/d": "near duplicate of s3://b/a (phash distance 3)",
    }
    assert dedup(records, FilterConfig(phash_max_distance=None, exact_dedup=False)).dropped == {}


def test_stage_tasks_run_alone_on_lists_and_on_a_dataset(tmp_path, prefect_server, ray_session):
    """fetch/decode/filter/dedup/write as Prefect tasks of a user's own flow, without the VLM:
    over a list of URIs (computed in the flow process) and over a Ray Dataset (lazy stages, one
    pipeline) they agree with the corpus's expected outcomes. The Dataset is split so that both
    fetch workers get input."""
    from prefect import flow

    from prefect_rayllm.rayllm_stages.curation.stages import fetch_batch_size, image_dataset
    from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
    from prefect_rayllm.tasks.curation import decode_images, dedup_images, fetch_images, filter_images, write_curation

    corpus = build_corpus(str(tmp_path / "corpus"))
    uris = corpus.uris()
    rules, near = {"min_width": 32, "min_height": 32}, {"phash_max_distance": 6}

    @flow
    def on_a_list() -> tuple[list[dict], Manifest]:
        decoded = decode_images(fetch_images(uris, {"max_attempts": 2}), {"max_edge": 64})
        records = dedup_images(filter_images(decoded, rules), near)
        return records, write_curation(records, str(tmp_path / "out"), contact_sheet_images=6)

    @flow
    def on_a_dataset() -> tuple[list[dict], int]:
        dataset = image_dataset(uris, fetch_batch_size(len(uris), workers=2, max_concurrency=32))
        staged = filter_images(decode_images(fetch_images(dataset, {"max_attempts": 2}, workers=2)), rules)
        return dedup_images(staged, near).take_all(), dataset.num_blocks()

    expected_stage = {"kept": "", "fetch_error": "fetch", "decode_error": "decode", "duplicate": "dedup"}
    records, manifest = on_a_list()
    dataset_records, blocks = on_a_dataset()
    assert blocks == 2
    for found in (records, dataset_records):
        stages = {r["uri"]: r["stage"] for r in found}
        assert stages == {uri: expected_stage[e.outcome] for uri, e in corpus.expected.items()}
    assert manifest.job == "curation" and manifest.counts.total == 16 and manifest.counts.completed == 8
    assert manifest.curation.rejected_by_stage == {"fetch": 1, "decode": 5, "dedup": 2}
    assert len(manifest.curation.contact_sheet["kept"]) == 3 and len(manifest.curation.contact_sheet["rejected"]) == 3
    assert Image.open(tmp_path / "out" / "contact_sheet.png").format == "PNG"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest.model_dump(mode="json")


def test_proxy_stall_holds_matching_gets_until_released(local_s3, corpus):
    """The proxy's injected stall fault (used to stop a run half-way in the resume test)."""
    import threading
    import time

    import s3fs

    key = corpus.uris("kept")[0].removeprefix("s3://")
    with S3Proxy(local_s3.endpoint_url, stall_gets=lambda path: path.endswith("a-shapes.png")) as proxy:
        fs = s3fs.S3FileSystem(**through(proxy.endpoint_url), skip_instance_cache=True)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(fs.cat_file(key)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30  # the GET reaches the proxy within a second when the machine is quiet
        while proxy.stats.stalled < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # held, not merely late
        assert not got and proxy.stats.stalled == 1
        assert fs.ls("curation/corpus/images")  # listings and other keys pass
        proxy.release()
        reader.join(10)
    assert got and got[0] == local_s3.filesystem().cat_file(key)
