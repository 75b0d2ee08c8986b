"""Curation fetch+decode: images/s per CPU core against a local S3 server, next to img2dataset's ~100/s/core.

    .venv/bin/python bench/fetch_decode_bench.py [--images 600] [--concurrency 32] [--batch 64] [--rounds 2]

A moto S3 server runs in a process of its own (`curation_bench.S3Side`, reached directly, not
through the latency proxy) and gets a deterministic corpus of web-size images: JPEGs (quality 85)
from 640x480 to 1600x1200, landscape and portrait, every eighth a PNG of 640x480 or 800x600, each a
smooth random colour field with random shapes and fine grain on top (about 220 KiB on average; no
solid colours). Then, in this process, our two curation stages run as a Ray worker runs them, with
no Ray around them (so the figures are the stages' own cost):

    fetch, threads : `FetchImages` (thread pool over s3fs `cat_file`, the shipped fetch stage) per batch
    fetch, bulk    : the same filesystem (single-attempt options) read with s3fs's async bulk
                     `fs.cat([...])` (all reads of a batch in s3fs's event loop, `--concurrency` at once)
    decode         : `DecodeImages` (the shipped decode stage: draft, EXIF, RGB, resize to 448, PNG, hashes)
    fetch+decode   : the next batch is fetched (threads) while this one decodes, as the two Ray stages overlap

Per core is counted two ways, both printed: images/s divided by `os.cpu_count()` (every core of the
machine, the S3 server's share included) and images per CPU-second of the client process (all its
threads, psutil `cpu_times` user+system: what our stages cost, with the server's CPU left out, as
img2dataset's servers are elsewhere on the web). The server process's CPU seconds are measured the
same way, so the split between client and server is printed, as are botocore's SigV4 signing cost
per request and decode ms per image. Results go to bench/results/fetch-decode-<time>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BUCKET = "fetch-decode-bench"
IMG2DATASET_PER_CORE = 100.0  # img2dataset's README: about 100 images/s per core, fetch + resize
SIZES = ((640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (768, 1024))
sys.path.insert(0, str(REPO / "bench"))

from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig, DecodeImages  # noqa: E402
from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig, FetchImages  # noqa: E402

# -- corpus ------------------------------------------------------------------------------------


def web_image(index: int) -> tuple[str, bytes]:
    """A deterministic web-size image: smooth colour field, random shapes, 2x2 grain; JPEG or PNG."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    png = index % 8 == 7
    width, height = ((640, 480) if index % 16 == 7 else (800, 600)) if png else SIZES[index % len(SIZES)]
    grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse, draw.rectangle, draw.line)[int(rng.integers(0, 3))](box, fill=colour)
    grain = rng.integers(-12, 13, (height // 2, width // 2, 1), dtype=np.int16).repeat(2, 0).repeat(2, 1)
    pixels = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    if png:
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
        return f"img-{index:06d}.png", buffer.getvalue()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=85)
    return f"img-{index:06d}.jpg", buffer.getvalue()


def upload_corpus(storage_options: dict[str, Any], images: int, bucket: str = BUCKET) -> tuple[list[str], int]:
    """Put the corpus into `bucket`; returns the URIs and the total bytes."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    files = {f"{bucket}/web/{name}": data for name, data in (web_image(i) for i in range(images))}
    fs.pipe(files)
    return [f"s3://{path}" for path in sorted(files)], sum(len(data) for data in files.values())


# -- measuring ---------------------------------------------------------------------------------


class CpuMeter:
    """Wall seconds and CPU seconds (user+system, all threads) of this process and the server's."""

    def __init__(self, server_pid: int | None):
        self.client = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None

    @staticmethod
    def cpu(process: psutil.Process | None) -> float:
        if process is None:
            return float("nan")
        times = process.cpu_times()
        return times.user + times.system

    def measure(self, fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
        client0, server0, wall0 = self.cpu(self.client), self.cpu(self.server), time.perf_counter()
        value = fn()
        wall = time.perf_counter() - wall0
        return {
            "wall_s": wall,
            "client_cpu_s": self.cpu(self.client) - client0,
            "server_cpu_s": self.cpu(self.server) - server0,
        }, value


def batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fetch_threads(fetcher: FetchImages, uris: list[str], batch: int) -> list[dict[str, np.ndarray]]:
    return [fetcher({"uri": np.array(chunk, dtype=object)}) for chunk in batches(uris, batch)]


def fetch_bulk(fetcher: FetchImages, uris: list[str], batch: int, concurrency: int) -> list[dict[str, Any]]:
    """s3fs's async bulk read over the fetch stage's own filesystem (same single-attempt options)."""
    fs = fetcher.filesystem(uris[0])
    out = []
    for chunk in batches(uris, batch):
        paths = [fs._strip_protocol(uri) for uri in chunk]
        read = fs.cat(paths, on_error="return", batch_size=concurrency)
        out.append({"uri": chunk, "image_bytes": [read[p] for p in paths]})
    return out


def check_fetched(fetched: list[dict[str, Any]], expected: int) -> int:
    """Bytes read; every object must have arrived with no error."""
    values = [value for part in fetched for value in part["image_bytes"]]
    assert len(values) == expected, (len(values), expected)
    bad = [value for value in values if isinstance(value, BaseException) or not value]
    assert not bad, f"{len(bad)} objects not read: {bad[:3]}"
    if "fetch_error" in fetched[0]:
        errors = [e for part in fetched for e in part["fetch_error"] if e]
        assert not errors, errors[:3]
    return sum(len(value) for value in values)


def check_decoded(decoded: list[dict[str, np.ndarray]], expected: int) -> None:
    errors = [e for part in decoded for e in part["decode_error"] if e]
    assert not errors, errors[:3]
    edges = [max(w, h) for part in decoded for w, h in zip(part["norm_width"], part["norm_height"], strict=True)]
    assert len(edges) == expected and max(edges) <= 448 and min(edges) > 0, (len(edges), max(edges, default=0))


def slices(part: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`part` cut into `count` row ranges (a Ray Data batch split across `count` decode workers)."""
    rows = len(part["uri"])
    step = max(1, -(-rows // count))
    return [{key: values[i : i + step] for key, values in part.items()} for i in range(0, rows, step)]


def decode_all(
    decoder: DecodeImages, pool: ThreadPoolExecutor, threads: int, part: dict[str, Any]
) -> list[dict[str, np.ndarray]]:
    """Decode one batch on `threads` threads (Pillow releases the GIL while it decodes, resizes and encodes)."""
    return list(pool.map(decoder, slices(part, threads)))


def fetch_and_decode(
    fetcher: FetchImages, decoder: DecodeImages, uris: list[str], batch: int, pool: ThreadPoolExecutor, threads: int
) -> list[dict[str, np.ndarray]]:
    """Fetch batch k+1 on a helper thread while batch k decodes, as the fetch and decode stages overlap in Ray."""
    chunks = batches(uris, batch)
    decoded: list[dict[str, np.ndarray]] = []
    pending: dict[str, Any] = {}

    def fetch(chunk: list[str]) -> None:
        pending["batch"] = fetcher({"uri": np.array(chunk, dtype=object)})

    thread = threading.Thread(target=fetch, args=(chunks[0],))
    thread.start()
    for index in range(len(chunks)):
        thread.join()
        current = pending.pop("batch")
        if index + 1 < len(chunks):
            thread = threading.Thread(target=fetch, args=(chunks[index + 1],))
            thread.start()
        decoded.extend(decode_all(decoder, pool, threads, current))
    return decoded


def signing_ms(requests: int = 2000) -> float:
    """botocore SigV4 signing of one S3 GET, in ms (what every fetched object pays before it is sent)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    auth = S3SigV4Auth(Credentials("testing", "testing"), "s3", "us-east-1")
    started = time.process_time()
    for i in range(requests):
        auth.add_auth(AWSRequest(method="GET", url=f"http://127.0.0.1:9000/{BUCKET}/web/img-{i:06d}.jpg", headers={}))
    return (time.process_time() - started) / requests * 1000


def decode_breakdown(samples: list[bytes], config: DecodeConfig) -> dict[str, float]:
    """CPU ms per image of each step of `decode_image`, timed one step at a time over `samples`."""
    import hashlib

    from PIL import Image, ImageOps

    from prefect_rayllm.rayllm_stages.curation.decode import encode, perceptual_hash, to_rgb

    def load(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft(None, (config.max_edge, config.max_edge))
        image.load()
        return image

    def shrink(image: Image.Image) -> Image.Image:
        small = image.copy()
        small.thumbnail((config.max_edge, config.max_edge), Image.Resampling.LANCZOS)
        return small

    def per_image(fn: Callable[[Any], Any], items: list[Any]) -> tuple[float, list[Any]]:
        started = time.process_time()
        out = [fn(item) for item in items]
        return (time.process_time() - started) / len(items) * 1000, out

    steps: dict[str, float] = {}
    steps["open_draft_load"], images = per_image(load, samples)
    steps["exif_rgb"], rgbs = per_image(lambda image: to_rgb(ImageOps.exif_transpose(image)), images)
    steps["resize"], smalls = per_image(shrink, rgbs)
    steps["encode"], _ = per_image(lambda image: encode(image, config), smalls)
    steps["phash"], _ = per_image(perceptual_hash, rgbs)
    steps["sha256"], _ = per_image(lambda data: hashlib.sha256(data).hexdigest(), samples)
    return steps


def rates(n: int, m: dict[str, float]) -> dict[str, float]:
    cores = os.cpu_count() or 1
    out = dict(m)
    out["images_per_s"] = n / m["wall_s"]
    out["per_core_machine"] = out["images_per_s"] / cores
    out["per_client_cpu_s"] = n / m["client_cpu_s"] if m["client_cpu_s"] > 0 else float("nan")
    both = m["client_cpu_s"] + (0.0 if m["server_cpu_s"] != m["server_cpu_s"] else m["server_cpu_s"])
    out["per_cpu_s_with_server"] = n / both if both > 0 else float("nan")
    out["client_ms_per_image"] = m["client_cpu_s"] / n * 1000
    out["server_ms_per_image"] = m["server_cpu_s"] / n * 1000
    return out


def run_bench(
    storage_options: dict[str, Any],
    uris: list[str],
    *,
    server_pid: int | None = None,
    concurrency: int = 32,
    batch: int = 64,
    rounds: int = 1,
    output_format: Literal["PNG", "JPEG"] = "PNG",
    decode_threads: int | None = None,
) -> dict[str, Any]:
    """Measure the stages over `uris` (already uploaded); `server_pid` is the S3 server's process, if separate."""
    decode_threads = decode_threads or os.cpu_count() or 1
    pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
    meter = CpuMeter(server_pid)
    n = len(uris)
    fetch_config = FetchConfig(storage_options=storage_options, max_concurrency=concurrency)
    decode_config = DecodeConfig(output_format=output_format)
    fetcher, decoder = FetchImages(fetch_config), DecodeImages(decode_config)
    fetcher.fetch_one(uris[0])  # filesystem, client and connection made outside the timing
    fetch_threads(fetcher, uris[: min(n, batch)], batch)  # warm the pool and the server's code paths
    runs: dict[str, list[dict[str, float]]] = {"fetch_threads": [], "fetch_bulk": [], "decode": [], "fetch_decode": []}
    total_bytes = 0
    for _ in range(rounds):
        m, fetched = meter.measure(lambda: fetch_threads(fetcher, uris, batch))
        total_bytes = check_fetched(fetched, n)
        runs["fetch_threads"].append(rates(n, m))
        m, bulk = meter.measure(lambda: fetch_bulk(fetcher, uris, batch, concurrency))
        check_fetched(bulk, n)
        runs["fetch_bulk"].append(rates(n, m))
        m, decoded = meter.measure(
            lambda fetched=fetched: [out for part in fetched for out in decode_all(decoder, pool, decode_threads, part)]
        )
        check_decoded(decoded, n)
        runs["decode"].append(rates(n, m))
        m, decoded = meter.measure(lambda: fetch_and_decode(fetcher, decoder, uris, batch, pool, decode_threads))
        check_decoded(decoded, n)
        runs["fetch_decode"].append(rates(n, m))
    pool.shutdown()
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()}
    whole = medians["fetch_decode"]
    return {
        "images": n,
        "fetched": sum(1 for part in fetched for error in part["fetch_error"] if not error),
        "decoded": sum(1 for part in decoded for error in part["decode_error"] if not error),
        "mean_kib": total_bytes / n / 1024,
        "cores": os.cpu_count(),
        "concurrency": concurrency,
        "batch": batch,
        "rounds": rounds,
        "stages": medians,
        "runs": runs,
        "output_format": output_format,
        "decode_threads": decode_threads,
        "signing_ms": signing_ms(),
        "decode_steps_ms": decode_breakdown([bytes(b) for b in fetched[0]["image_bytes"][:48]], decode_config),
        "images_per_s": whole["images_per_s"],
        "per_core_machine": whole["per_core_machine"],
        "per_client_cpu_s": whole["per_client_cpu_s"],
        "vs_img2dataset_machine": whole["per_core_machine"] / IMG2DATASET_PER_CORE,
        "vs_img2dataset_client": whole["per_client_cpu_s"] / IMG2DATASET_PER_CORE,
        "bulk_over_threads": medians["fetch_bulk"]["images_per_s"] / medians["fetch_threads"]["images_per_s"],
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def report(r: dict[str, Any]) -> str:
    def server(value: float) -> str:
        return "-" if value != value else f"{value:.2f}"  # NaN: the server shares this process

    lines = [
        f"# Curation fetch+decode: {r['images']} web-size images ({r['mean_kib']:.0f} KiB mean), local moto S3, "
        f"{r['cores']} cores, medians of {r['rounds']} round(s), 1-min load average {r['load_average']:.1f}, {r['date']}"
        + (f"; through the proxy, +{r['latency_ms']:g} ms per request" if r.get("latency_ms") else "")
        + ("; s3fs HEAD before each GET (as before)" if r.get("head_before_get") else ""),
        "",
        "| stage | wall s | images/s | images/s per core (cpu_count) | images per client CPU-s | "
        "images per client+server CPU-s | client CPU ms/image | server CPU ms/image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "fetch_threads": f"fetch, FetchImages (threads, {r['concurrency']} in flight)",
        "fetch_bulk": f"fetch, s3fs bulk fs.cat ({r['concurrency']} in flight)",
        "decode": f"decode, DecodeImages (to 448 px {r['output_format']} + hashes; {r['decode_threads']} threads)",
        "fetch_decode": "fetch+decode (fetch overlapped with decode)",
    }
    for key, name in names.items():
        s = r["stages"][key]
        lines.append(
            f"| {name} | {s['wall_s']:.2f} | {s['images_per_s']:.1f} | {s['per_core_machine']:.1f} | "
            f"{s['per_client_cpu_s']:.1f} | {s['per_cpu_s_with_server']:.1f} | {s['client_ms_per_image']:.2f} | "
            f"{server(s['server_ms_per_image'])} |"
        )
    lines += [
        "",
        f"fetch+decode: **{r['images_per_s']:.1f} images/s**; per core: {r['per_core_machine']:.1f} (images/s / "
        f"{r['cores']} cores) = **{r['vs_img2dataset_machine']:.2f}x** img2dataset's ~100/s/core; "
        f"{r['per_client_cpu_s']:.1f} per client CPU-second = **{r['vs_img2dataset_client']:.2f}x**; "
        f"{r['stages']['fetch_decode']['per_cpu_s_with_server']:.1f} per CPU-second of client and server together",
        f"s3fs bulk fs.cat / FetchImages threads (fetch images/s): {r['bulk_over_threads']:.2f}",
        f"botocore SigV4 signing: {r['signing_ms']:.3f} ms per GET",
        "decode CPU ms per image, step by step: " + ", ".join(f"{k} {v:.2f}" for k, v in r["decode_steps_ms"].items()),
    ]
    return "\n".join(lines)


def bench(images: int, latency_ms: float = 0.0, head_before_get: bool = False, **options: Any) -> dict[str, Any]:
    """Start the S3 server process, upload `images` images, run `run_bench` (keyword `options`) over them.

    With `latency_ms` the stages read through our latency proxy (in the server's process) instead of
    from moto directly; `head_before_get` gives s3fs its default max_concurrency (10), which sends a
    HEAD before every GET (the fetch stage sets 1): the fetch stage as it was before that change.
    """
    from curation_bench import S3Side

    s3 = S3Side(latency_ms=latency_ms)
    try:
        started = time.perf_counter()
        uris, _ = upload_corpus(s3.options(through_proxy=False), images)
        print(f"uploaded {len(uris)} images in {time.perf_counter() - started:.1f} s", flush=True)
        storage_options = s3.options(through_proxy=latency_ms > 0)
        if head_before_get:
            storage_options["max_concurrency"] = 10
        result = run_bench(storage_options, uris, server_pid=s3.process.pid, **options)
        result.update(latency_ms=latency_ms, head_before_get=head_before_get)
        return result
    finally:
        s3.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32, help="reads in flight (the fetch stage's default)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch handed to each stage")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four measurements (medians are shown)")
    parser.add_argument("--decode-threads", type=int, default=None, help="decode threads (default: os.cpu_count())")
    parser.add_argument("--output-format", choices=("PNG", "JPEG"), default="PNG", help="the decode stage's output_format")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="read through our proxy, which delays every request")
    parser.add_argument("--head-before-get", action="store_true", help="s3fs's default HEAD before each GET (as before)")
    args = parser.parse_args()
    result = bench(
        args.images,
        latency_ms=args.latency_ms,
        head_before_get=args.head_before_get,
        concurrency=args.concurrency,
        batch=args.batch,
        rounds=args.rounds,
        output_format=args.output_format,
        decode_threads=args.decode_threads,
    )
    result["command"] = " ".join([".venv/bin/python", "bench/fetch_decode_bench.py", *sys.argv[1:]])
    print(report(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fetch-decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
