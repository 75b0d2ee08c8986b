"""Image curation benchmark: is the whole pipeline about as fast as its slowest stage?

    .venv/bin/python bench/curation_bench.py [--images 2000] [--quick] [--repeat N] [--model DIR] [--latency-ms 20]

A moto S3 server and our latency-injecting proxy (`rayllm_stages.s3_proxy.S3Proxy`, every request
delayed by --latency-ms, no faults) run on loopback in a separate process, as S3 would be. N
varied 64x64 images (PNG and JPEG, distinct enough that dedup keeps nearly all) are uploaded to
it, and the tiny VLM is built locally unless --model is given. Then, in this process, with one
local Ray:

    warm-up      : one unmeasured curation of 32 images (imports, Prefect server, vLLM's compile cache)
    sequential   : a plain loop of s3fs `cat_file` calls through the proxy, one object after another
    fetch alone  : image_dataset -> fetch_stage, materialised (same fetch settings as the flow)
    decode alone : decode_stage over the fetched Dataset (materialised beforehand), materialised
    VLM alone    : caption_stage over the decoded Dataset (materialised beforehand), rows iterated;
                   it includes the vLLM engine start, as the flow does
    whole (core) : prefect_rayllm.rayllm_stages.curation.run.CurationJob.run (list, fetch -> decode -> VLM in one
                   streaming pipeline, records committed, rules, dedup, Parquet, contact sheet)
    whole (flow) : the `curate_images` Prefect flow over the same images into a fresh output

With --repeat N the five measurements after the sequential loop run N rounds and medians are shown.
It prints the ratios whole / slowest stage alone (target <= 1.3) and whole / sum of the stages
(below 1 means the stages overlap), fetch throughput (objects/s) of the fetch stage and of the
sequential loop, and writes bench/results/curation.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BUCKET = "curation-bench"
sys.path.insert(0, str(REPO))


# -- the S3 side, in its own process --------------------------------------------------------


def serve_s3(latency_ms: float) -> None:
    """moto + proxy; prints the endpoints, answers `stats` lines on stdin with the proxy's counters."""
    from prefect_rayllm.rayllm_stages.testing.local_s3 import start_local_s3
    from prefect_rayllm.rayllm_stages.testing.s3_proxy import S3Proxy

    s3 = start_local_s3()
    proxy = S3Proxy(s3.endpoint_url, latency_s=latency_ms / 1000.0).start()
    print(json.dumps({"s3": s3.endpoint_url, "proxy": proxy.endpoint_url}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            with proxy.stats.lock:
                stats = {"requests": proxy.stats.requests, "object_gets": proxy.stats.object_gets}
            print(json.dumps(stats), flush=True)
    proxy.stop()
    s3.stop()


class S3Side:
    def __init__(self, latency_ms: float):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-s3", "--latency-ms", str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        endpoints = json.loads(self.process.stdout.readline())
        self.s3_url, self.proxy_url = endpoints["s3"], endpoints["proxy"]

    def options(self, through_proxy: bool) -> dict[str, Any]:
        url = self.proxy_url if through_proxy else self.s3_url
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url}}

    def proxy_stats(self) -> dict[str, int]:
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- corpus and model ----------------------------------------------------------------------


def bench_image(index: int) -> tuple[str, bytes]:
    """A 64x64 image: a random 4x4 colour grid, smoothly upscaled, with a random shape on top."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(grid, "RGB").resize((64, 64), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    x0, y0 = (int(v) for v in rng.integers(0, 40, 2))
    size = int(rng.integers(8, 24))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if index % 3 else draw.rectangle)((x0, y0, x0 + size, y0 + size), fill=colour)
    buffer = io.BytesIO()
    if index % 2:
        image.save(buffer, format="JPEG", quality=90)
        return f"img-{index:06d}.jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return f"img-{index:06d}.png", buffer.getvalue()


def upload_corpus(s3: S3Side, images: int) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options(through_proxy=False))
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    files = dict(bench_image(i) for i in range(images))
    fs.pipe({f"{BUCKET}/images/{name}": data for name, data in files.items()})
    return f"s3://{BUCKET}/images/"


def model_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    from prefect_rayllm.rayllm_stages.testing.tiny_vision import build_tiny_vision_model

    folder = RESULTS / "curation-model"
    if not (folder / "config.json").exists():
        build_tiny_vision_model(folder)
    return folder


# -- measurements ------------------------------------------------------------------------------


def timed(fn) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def sequential_loop(s3: S3Side, uris: list[str]) -> float:
    """Plain s3fs, one object after another, through the proxy (s3fs's default settings)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options(through_proxy=True), skip_instance_cache=True)
    fs.cat_file(uris[0].removeprefix("s3://"))  # connection set up outside the timing
    seconds, total = timed(lambda: sum(len(fs.cat_file(u.removeprefix("s3://"))) for u in uris))
    assert total > 0
    return seconds


def iterate(dataset) -> tuple[int, float | None]:
    """Consume a Dataset row by row as the flow does; (rows, seconds to the first row)."""
    from prefect_rayllm.rayllm_stages.curation.stages import stream_rows

    started, first, rows = time.perf_counter(), None, 0
    for _ in stream_rows(dataset):
        if first is None:
            first = time.perf_counter() - started
        rows += 1
    return rows, first


class FirstRecord:
    """A progress callback noting when the first records (16: the first progress report) arrived."""

    def start(self):
        self.started, self.seconds = time.perf_counter(), None
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.seconds is None and done > 0:
            self.seconds = time.perf_counter() - self.started


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.model)
    s3 = S3Side(args.latency_ms)
    work = Path(tempfile.mkdtemp(prefix="curation-bench-"))
    try:
        return measure(args, s3, model, work)
    finally:
        s3.close()
        if not args.keep_work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, s3: S3Side, model: Path, work: Path) -> dict[str, Any]:
    from prefect_rayllm.flows.curation import curate_images
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
    from prefect_rayllm.rayllm_stages.curation.run import CurationJob
    from prefect_rayllm.rayllm_stages.curation.source import iter_image_uris
    from prefect_rayllm.rayllm_stages.curation.stages import (
        caption_stage,
        decode_stage,
        fetch_batch_size,
        fetch_stage,
        image_dataset,
    )
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
    from prefect_rayllm.tasks.progress import progress_listener

    started_upload = time.perf_counter()
    images_url = upload_corpus(s3, args.images)
    print(f"uploaded {args.images} images in {time.perf_counter() - started_upload:.1f} s", flush=True)
    ray_runtime.connect()

    def config(output: str, limit: int | None = None) -> CurationConfig:
        return CurationConfig.model_validate(
            {
                "source": {"url": images_url, "storage_options": s3.options(through_proxy=True), "limit": limit},
                "output": output,
                "model": {
                    "source": str(model),
                    "engine_kwargs": {"max_model_len": 512, "dtype": "float32"},
                    "batch_size": args.batch_size,
                },
                "fetch": {"max_concurrency": args.fetch_concurrency},
                "fetch_workers": args.fetch_workers,
                "filter": {"min_width": 32, "min_height": 32},
            }
        )

    results: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    print("warm-up: 32 images through the flow (unmeasured)", flush=True)
    curate_images(config=config(str(work / "warmup"), limit=32), overwrite=True)

    cfg = config(str(work / "core"))
    uris = list(iter_image_uris(cfg.source))
    assert len(uris) == args.images, (len(uris), args.images)
    results["sequential_s"] = sequential_loop(s3, uris)
    print(f"sequential s3fs loop: {results['sequential_s']:.1f} s", flush=True)

    batch = fetch_batch_size(len(uris), cfg.fetch_workers, cfg.fetch.max_concurrency)
    pairs = list(enumerate(uris))

    def one_round(number: int) -> dict[str, Any]:
        r: dict[str, Any] = {"round": number, "load_start": os.getloadavg()[0]}
        gets_before = s3.proxy_stats()["object_gets"]
        r["fetch_s"], fetched = timed(
            lambda: fetch_stage(image_dataset(pairs, batch), cfg.fetch, cfg.fetch_workers, batch).materialize()
        )
        r["fetch_gets"] = s3.proxy_stats()["object_gets"] - gets_before
        failed = fetched.filter(lambda row: bool(row["fetch_error"])).count()
        assert failed == 0, f"{failed} fetch errors"
        print(f"[{number}] fetch alone: {r['fetch_s']:.1f} s", flush=True)

        r["decode_s"], decoded = timed(lambda: decode_stage(fetched, cfg.decode, cfg.decode_workers).materialize())
        print(f"[{number}] decode alone: {r['decode_s']:.1f} s", flush=True)

        r["vlm_s"], (rows, first) = timed(
            lambda: iterate(caption_stage(decoded, cfg.model, cfg.prompt, cfg.json_schema, cfg.sampling))
        )
        r["vlm_first_row_s"] = first
        assert rows == len(uris), rows
        print(f"[{number}] VLM alone: {r['vlm_s']:.1f} s (first row after {first:.1f} s)", flush=True)

        first_record = FirstRecord()
        r["core_s"], core = timed(lambda: CurationJob(cfg).run(overwrite=True, on_progress=first_record.start()))
        r["core_first_records_s"] = first_record.seconds
        print(
            f"[{number}] whole (rayllm_stages CurationJob): {r['core_s']:.1f} s (16 records after {first_record.seconds:.1f} s)",
            flush=True,
        )
        with progress_listener(first_record.start()):
            r["flow_s"], flow = timed(lambda: curate_images(config=config(str(work / "flow")), overwrite=True))
        r["flow_first_records_s"] = first_record.seconds
        print(f"[{number}] whole (Prefect flow): {r['flow_s']:.1f} s (16 records after {first_record.seconds:.1f} s)", flush=True)
        for manifest in (core, flow):
            assert manifest.counts.total == manifest.counts.completed + manifest.counts.failed == len(uris), manifest
        assert flow.curation is not None
        r["manifest"] = {
            "input": flow.counts.total,
            "curated": flow.counts.completed,
            "rejected": flow.counts.failed,
            "rejected_by_stage": flow.curation.rejected_by_stage,
            "fetch": flow.curation.fetch,
            "tokens": {"in": flow.throughput.tokens_in, "out": flow.throughput.tokens_out},
        }
        r["load_end"] = os.getloadavg()[0]
        return r

    rounds = [one_round(number) for number in range(1, args.repeat + 1)]
    results["rounds"] = rounds
    for key in (
        "fetch_s",
        "decode_s",
        "vlm_s",
        "vlm_first_row_s",
        "core_s",
        "core_first_records_s",
        "flow_s",
        "flow_first_records_s",
    ):
        results[key] = statistics.median(r[key] for r in rounds)
    results["manifest"] = rounds[-1]["manifest"]
    return results


def report(args: argparse.Namespace, r: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    n = args.images
    stages = {"fetch": r["fetch_s"], "decode": r["decode_s"], "VLM": r["vlm_s"]}
    slowest_name = max(stages, key=stages.get)
    slowest, total = stages[slowest_name], sum(stages.values())
    ratios = {
        "flow_over_slowest": round(r["flow_s"] / slowest, 3),
        "flow_over_sum": round(r["flow_s"] / total, 3),
        "core_over_slowest": round(r["core_s"] / slowest, 3),
        "core_over_sum": round(r["core_s"] / total, 3),
    }
    throughput = {
        "fetch_stage_objects_per_s": round(n / r["fetch_s"], 1),
        "sequential_s3fs_objects_per_s": round(n / r["sequential_s"], 1),
    }
    throughput["fetch_speedup"] = round(throughput["fetch_stage_objects_per_s"] / throughput["sequential_s3fs_objects_per_s"], 1)
    load = os.getloadavg()[0]
    lines = [
        f"# Curation benchmark: {n} images (64x64 PNG/JPEG), tiny VLM on CPU vLLM, S3 via proxy +{args.latency_ms:g} ms per request",
        "",
        (
            f"{os.cpu_count()} cores; fetch: {args.fetch_workers} workers x {args.fetch_concurrency} in flight; "
            f"VLM batch {args.batch_size}; 1-min load average at the start {r['load_start']:.1f}, at the end {load:.1f}."
        ),
        "",
        f"Medians over {len(r['rounds'])} round(s); the sequential loop ran once.",
        "",
        "| measured | seconds | images/s |",
        "| --- | --- | --- |",
        f"| fetch alone (fetch stage, materialised) | {r['fetch_s']:.1f} | {n / r['fetch_s']:.1f} |",
        f"| decode alone (decode stage over fetched bytes) | {r['decode_s']:.1f} | {n / r['decode_s']:.1f} |",
        f"| VLM alone (caption stage over decoded images, engine start included; first row after {r['vlm_first_row_s']:.1f} s) | {r['vlm_s']:.1f} | {n / r['vlm_s']:.1f} |",
        f"| sum of the three | {total:.1f} | |",
        f"| whole, rayllm_stages (CurationJob.run; first records after {r['core_first_records_s']:.1f} s) | {r['core_s']:.1f} | {n / r['core_s']:.1f} |",
        f"| whole, Prefect flow (curate_images; first records after {r['flow_first_records_s']:.1f} s) | {r['flow_s']:.1f} | {n / r['flow_s']:.1f} |",
        f"| plain sequential s3fs loop (cat_file, one by one) | {r['sequential_s']:.1f} | {n / r['sequential_s']:.1f} |",
        "",
        (
            f"whole flow / slowest stage alone ({slowest_name}) = **{ratios['flow_over_slowest']}** (target <= 1.3); "
            f"without Prefect: {ratios['core_over_slowest']}"
        ),
        f"whole flow / sum of stages = **{ratios['flow_over_sum']}**; without Prefect: {ratios['core_over_sum']}",
        (
            f"fetch throughput through the proxy: fetch stage {throughput['fetch_stage_objects_per_s']} objects/s vs "
            f"sequential s3fs {throughput['sequential_s3fs_objects_per_s']} objects/s ({throughput['fetch_speedup']}x)"
        ),
        "",
        *[
            f"round {x['round']}: fetch {x['fetch_s']:.1f}, decode {x['decode_s']:.1f}, VLM {x['vlm_s']:.1f}, "
            f"whole core {x['core_s']:.1f}, whole flow {x['flow_s']:.1f} s -> flow / VLM {x['flow_s'] / x['vlm_s']:.3f} "
            f"(load {x['load_start']:.1f} -> {x['load_end']:.1f})"
            for x in r["rounds"]
        ],
        "",
        (
            f"flow outcome: {r['manifest']['curated']} curated, {r['manifest']['rejected']} rejected "
            f"({r['manifest']['rejected_by_stage']}); fetch: {r['manifest']['fetch']}"
        ),
    ]
    data = {
        "args": vars(args),
        "results": r,
        "ratios": ratios,
        "throughput": throughput,
        "load_average": load,
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return "\n".join(lines), data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 images: a check that everything runs")
    parser.add_argument("--model", help="VLM folder (default: build the tiny VLM into bench/results/curation-model)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay the proxy adds to every request")
    parser.add_argument("--batch-size", type=int, default=32, help="VLM rows per engine batch")
    parser.add_argument("--fetch-workers", type=int, default=2)
    parser.add_argument("--fetch-concurrency", type=int, default=32, help="reads in flight per fetch worker")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the stage and whole measurements (medians are shown)")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--serve-s3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_s3:
        serve_s3(args.latency_ms)
        return 0
    if args.quick:
        args.images = 200
    results = run(args)
    markdown, data = report(args, results)
    print(markdown)
    name = "curation" if not args.quick else "curation-quick"
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
