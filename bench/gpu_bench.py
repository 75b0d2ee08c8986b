"""GPU batch benchmark (issue 13): one request file through vLLM's run_batch, raw Ray Data LLM and `rayllm batch`.

One command on a GPU host builds a weightless model folder in a real model's shape (default: Llama-3.1-8B,
bf16, `load_format: dummy`), writes an OpenAI Batch file (default 4,096 requests of about 60 words,
exactly 256 tokens out through min_tokens = max_tokens = 256), and runs it, one system after another,
each in a fresh subprocess (its own Ray and vLLM engine; engine start is part of the measurement):

    vllm   python -m vllm.entrypoints.openai.run_batch (through a wrapper that only adds timestamps and
           keeps each finished request's engine timings)
    raw    ray.data.llm.build_processor(vLLMEngineProcessorConfig(...)) over ray.data.read_json, rows
           iterated in the driver (Ray's defaults, batch_size 64 as in the first measurement)
    ours   python -m prefect_rayllm.flows.cli batch CONFIG.yaml (defaults: no batch or engine tuning)

A system name takes `+key=value` overrides: engine kwargs (`vllm+max_num_seqs=1024`), or for raw and
ours the processor's `batch_size` / `max_concurrent_batches`; `raw+hook=1` adds our engine hook
(rayllm_stages.compat.engine_hooks: FINAL_ONLY outputs) to raw Ray Data LLM.

For each system it prints and records: wall time (launch -> exit), time to the first result, when the
engine took its first request, output tokens/s including start, steady-state decode tokens/s (the
engine's, from 10% to 90% of the generated tokens, from vLLM's per-request timings), the engine's
running and waiting requests and KV-cache use over time (per-request timings; vLLM's own log lines
as a cross-check), the GPU's busy share (NVML), the busiest processes' CPU use, the memory-bandwidth
roofline and the ratios against run_batch. Results: bench/results/gpu-<tag>.json after every
system; `--report FILE --readme` renders a finished file into bench/README.md.

    python bench/gpu_bench.py                              # the issue's workload, on a GPU host
    python bench/gpu_bench.py --smoke                      # tiny model, 64 requests, CPU or GPU
    python bench/gpu_bench.py --systems vllm,ours,vllm+max_num_seqs=1024+max_num_batched_tokens=16384
    python bench/gpu_bench.py --report bench/results/gpu-x.json --readme
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MARKER = "BENCH_JSON "
PACKAGE_FOLDERS = ("flows", "tasks", "rayllm_stages", "deployments")
README_START, README_END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"
_TEXT = (
    "the quick brown fox jumps over a lazy dog while rivers run to the sea and mountains rise above "
    "quiet towns where people write short poems about light rain wind stone bread music winter summer "
    "ships bridges markets gardens lamps stories numbers colours questions answers friends strangers "
    "morning evening history future science engines data streams stages rows batches models tokens"
)
WORDS = _TEXT.split()


# -- the package, importable with or without an install ---------------------------------------


def package_path() -> str | None:
    """A folder that makes `prefect_rayllm` importable from this checkout (None: it already is)."""
    try:
        import prefect_rayllm.rayllm_stages  # noqa: F401

        return None
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="rayllm-shim-"))
    (shim / "prefect_rayllm").mkdir()
    for folder in PACKAGE_FOLDERS:
        (shim / "prefect_rayllm" / folder).symlink_to(REPO / folder)
    sys.path.insert(0, str(shim))
    return str(shim)


# -- helper scripts (run with this Python in their own process) -------------------------------

RUN_BATCH_WRAPPER = r'''
"""vLLM's `python -m vllm.entrypoints.openai.run_batch` (parse_args + main), with timestamps, each
finished request's engine timings, and do_log_stats every 2 s (what vLLM's API server does)."""
import asyncio, dataclasses, json, os, sys, time

MARKER = "BENCH_JSON "


def main():
    marks = {"script_start": time.time()}
    import vllm.entrypoints.launchers.run_batch as rb
    from vllm.v1.engine.async_llm import AsyncLLM

    timings, capacity = [], {}
    original_generate = AsyncLLM.generate

    async def generate(self, *args, **kwargs):
        async for output in original_generate(self, *args, **kwargs):
            if output.finished:
                metrics = dataclasses.asdict(output.metrics) if output.metrics is not None else {}
                metrics["rayllm_clock_offset"] = time.time() - time.monotonic()
                timings.append([metrics, len(output.prompt_token_ids or []), len(output.outputs[0].token_ids)])
                marks.setdefault("first_result", time.time())
                marks["last_result"] = time.time()
            yield output

    AsyncLLM.generate = generate
    original_run_batch = rb.run_batch

    async def run_batch(engine_client, args):
        marks["engine_ready"] = time.time()
        config = engine_client.vllm_config
        capacity["max_num_seqs"] = config.scheduler_config.max_num_seqs
        capacity["max_num_batched_tokens"] = config.scheduler_config.max_num_batched_tokens
        capacity["kv_tokens"] = (config.cache_config.num_gpu_blocks or 0) * config.cache_config.block_size

        async def log_stats():
            while True:
                await asyncio.sleep(2.0)
                await engine_client.do_log_stats()

        logger_task = asyncio.create_task(log_stats())
        try:
            return await original_run_batch(engine_client, args)
        finally:
            logger_task.cancel()
            marks["output_written"] = time.time()

    rb.run_batch = run_batch
    args = rb.parse_args()
    asyncio.run(rb.main(args))
    marks["end"] = time.time()
    with open(os.environ["BENCH_TIMINGS"], "w") as out:
        json.dump(timings, out)
    print(MARKER + json.dumps({"marks": marks, "capacity": capacity}), flush=True)


if __name__ == "__main__":
    main()
'''

RAW_RAY_DATA_LLM = r'''
"""Raw Ray Data LLM: read_json -> build_processor(vLLMEngineProcessorConfig) -> rows in the driver."""
import json, os, sys, time

MARKER = "BENCH_JSON "
METRIC_KEYS = ("arrival_time", "queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts", "rayllm_max_num_seqs", "rayllm_kv_tokens", "rayllm_clock_offset")


def main():
    settings = json.loads(sys.argv[1])
    marks = {"script_start": time.time()}
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    init = dict(include_dashboard=False, log_to_driver=True)
    if not settings["gpu"]:
        init["num_cpus"] = 8
    ray.init(**init)
    marks["ray_ready"] = time.time()
    options = dict(model_source=settings["model"], engine_kwargs=settings["engine_kwargs"], batch_size=settings["batch_size"])
    if settings.get("max_concurrent_batches"):
        options["max_concurrent_batches"] = settings["max_concurrent_batches"]
    if not settings["gpu"]:
        options["placement_group_config"] = dict(bundles=[{"CPU": 1}])
        for stage in ("chat_template_stage", "tokenize_stage", "detokenize_stage"):
            options[stage] = dict(num_cpus=0.25)
    if settings.get("hook"):
        from prefect_rayllm.rayllm_stages.compat.engine_hooks import with_engine_hook

        for stage in ("chat_template_stage", "tokenize_stage", "detokenize_stage"):
            options[stage] = options.get(stage, {})
        options = with_engine_hook(options)
    config = vLLMEngineProcessorConfig(**options)

    def preprocess(row):
        body = row["body"]
        messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
        sampling = dict(temperature=float(body.get("temperature", 0.0)), max_tokens=int(body["max_tokens"]), min_tokens=int(body.get("min_tokens", 0)))
        return dict(messages=messages, sampling_params=sampling)

    def postprocess(row):
        metrics = row.get("metrics") or {}
        return dict(
            custom_id=row["custom_id"],
            num_input_tokens=int(row.get("num_input_tokens") or 0),
            num_generated_tokens=int(row.get("num_generated_tokens") or 0),
            **{key: float(metrics.get(key) or 0.0) for key in METRIC_KEYS},
        )

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    dataset = processor(ray.data.read_json(settings["input"]))
    rows = tokens_out = 0
    timings = []
    for row in dataset.iter_rows():
        if rows == 0:
            marks["first_result"] = time.time()
        rows += 1
        tokens_out += row["num_generated_tokens"]
        metrics = {key: row[key] for key in METRIC_KEYS}
        timings.append([metrics, row["num_input_tokens"], row["num_generated_tokens"]])
    marks["last_result"] = time.time()
    with open(settings["timings"], "w") as out:
        json.dump(timings, out)
    ray.shutdown()
    marks["end"] = time.time()
    print(MARKER + json.dumps({"marks": marks, "rows": rows, "tokens_out": tokens_out}), flush=True)


if __name__ == "__main__":
    main()
'''


# -- running one system: its output, CPU and GPU use, and nothing left behind -----------------


class Sampler:
    """Every second: CPU % of each process the run started (by name), GPU busy % and memory (NVML)."""

    def __init__(self, root_pid: int, started: float):
        import psutil

        self.psutil = psutil
        self.root = root_pid
        self.started = started
        self.procs: dict[int, Any] = {}
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.gpu: list[tuple[float, float, float]] = []  # (s, busy %, memory GiB)
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.nvml = self._nvml()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _nvml():
        try:
            try:
                import pynvml
            except ImportError:
                import ray._private.thirdparty.pynvml as pynvml
            pynvml.nvmlInit()
            return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            return None

    def loop(self) -> None:
        while not self.stop.wait(1.0):
            now = time.monotonic() - self.started
            try:
                root = self.psutil.Process(self.root)
                family = [root, *root.children(recursive=True)]
            except self.psutil.Error:
                family = []
            usage: dict[str, float] = {}
            for proc in family:
                try:
                    if proc.pid not in self.procs:
                        self.procs[proc.pid] = proc
                        self.seen[proc.pid] = proc.create_time()
                        proc.cpu_percent(None)
                        continue
                    name = _process_name(self.procs[proc.pid])
                    usage[name] = usage.get(name, 0.0) + self.procs[proc.pid].cpu_percent(None)
                except self.psutil.Error:
                    continue
            self.cpu.append((round(now, 1), {k: round(v, 1) for k, v in usage.items()}))
            if self.nvml:
                pynvml, handles = self.nvml
                try:
                    busy = sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles)
                    memory = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**30
                    self.gpu.append((round(now, 1), float(busy), round(memory, 1)))
                except Exception:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _process_name(proc: Any) -> str:
    try:
        cmd = proc.cmdline()
    except Exception:
        return proc.name()
    text = " ".join(cmd) if cmd else proc.name()
    for pattern in (r"ray::[\w().:-]+", r"VLLM::\w+", r"prefect\b[\w .-]*server", r"raylet", r"gcs_server", r"uvicorn"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)[:80]
    return (Path(cmd[0]).name if cmd else proc.name()) + (" " + Path(cmd[1]).name if len(cmd) > 1 else "")


def run_process(name: str, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` in its own session; time it, log its output with timestamps, sample it, reap it."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w", encoding="utf-8", errors="replace")
    log.write("$ " + " ".join(cmd) + "\n")
    launched = time.time()
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(REPO),
        start_new_session=True,
        text=True,
        errors="replace",
    )
    sampler = Sampler(proc.pid, started)
    markers: list[dict[str, Any]] = []
    lines: list[tuple[float, str]] = []
    tail: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            at = time.monotonic() - started
            log.write(f"[{at:8.2f}] {line}")
            if line.startswith(MARKER):
                try:
                    markers.append(json.loads(line[len(MARKER) :]))
                except json.JSONDecodeError:
                    pass
            if "Running:" in line or "KV cache size" in line:
                lines.append((at, line))
            tail.append(line.rstrip("\n"))
            del tail[:-40]

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        wall = time.monotonic() - started
        sampler.close()
        thread.join(timeout=10)
        leftovers = []
        for pid, created in sampler.seen.items():
            try:
                child = psutil.Process(pid)
                if abs(child.create_time() - created) < 0.5 and child.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(child)
            except psutil.Error:
                continue
        for child in leftovers:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=15)
        log.write(f"# exit {proc.returncode} after {wall:.2f} s; timed out: {timed_out}; killed leftovers: {len(leftovers)}\n")
        log.close()
    return {
        "name": name,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "launched_at": launched,
        "wall_s": round(wall, 2),
        "markers": markers,
        "stats_lines": lines,
        "tail": tail[-15:],
        "cpu": sampler.cpu,
        "gpu": sampler.gpu,
        "log": str(log_path),
    }


# -- inputs -------------------------------------------------------------------------------------


def write_requests(path: Path, count: int, words: int, max_tokens: int, seed: int = 0) -> None:
    """`count` chat requests of about `words` words, exactly `max_tokens` out (min_tokens = max_tokens)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(words - 8))
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": f"Request {i}: summarise the following in one line. {text}"}],
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "temperature": 0.0,
            }
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")


def build_model(shape: str, folder: Path) -> Path:
    if shape == "tiny":
        from prefect_rayllm.rayllm_stages.testing.tiny_models import build_tiny_chat_model

        return build_tiny_chat_model(folder)
    from prefect_rayllm.rayllm_stages.testing.shaped_models import build_dummy_model

    return build_dummy_model(folder, shape)


def parse_system(spec: str) -> tuple[str, dict[str, Any]]:
    """ "raw+batch_size=64+hook=1" -> ("raw", {"batch_size": 64, "hook": 1})."""
    kind, *pairs = spec.split("+")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if kind not in ("vllm", "raw", "ours"):
        raise SystemExit(f"unknown system {kind!r} in {spec!r}: vllm, raw or ours")
    return kind, overrides


PROCESSOR_KEYS = ("batch_size", "max_concurrent_batches", "hook")


# -- the three systems --------------------------------------------------------------------------


def run_vllm(ctx: dict[str, Any], spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
    work = ctx["work"]
    out = work / f"{_slug(spec)}.out.jsonl"
    script = work / "run_batch_timed.py"
    script.write_text(RUN_BATCH_WRAPPER)
    engine_kwargs = {**ctx["engine_kwargs"], **overrides}
    flags = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    cmd = [
        sys.executable,
        str(script),
        "-i",
        str(ctx["requests"]),
        "-o",
        str(out),
        "--model",
        str(ctx["model"]),
        "--served-model-name",
        "bench",
        *flags,
    ]
    env = {**ctx["env"], "BENCH_TIMINGS": str(work / f"{_slug(spec)}.timings.json")}
    run = run_process(spec, cmd, env, ctx["logs"] / f"{_slug(spec)}.log", ctx["timeout"])
    tokens = rows = 0
    if out.exists():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            if record.get("response") and record["response"].get("status_code") == 200:
                rows += 1
                tokens += record["response"]["body"]["usage"]["completion_tokens"]
    marker = run["markers"][-1] if run["markers"] else {}
    capacity = marker.get("capacity") or {}
    return _result(ctx, spec, run, rows, tokens, marker.get("marks", {}).get("first_result"), env["BENCH_TIMINGS"], capacity)


def run_raw(ctx: dict[str, Any], spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
    work = ctx["work"]
    script = work / "raw_ray_data_llm.py"
    script.write_text(RAW_RAY_DATA_LLM)
    engine_kwargs = {**ctx["engine_kwargs"], **{k: v for k, v in overrides.items() if k not in PROCESSOR_KEYS}}
    timings = work / f"{_slug(spec)}.timings.json"
    settings = {
        "input": str(ctx["requests"]),
        "model": str(ctx["model"]),
        "engine_kwargs": engine_kwargs,
        "batch_size": overrides.get("batch_size", 64),
        "max_concurrent_batches": overrides.get("max_concurrent_batches"),
        "hook": bool(overrides.get("hook")),
        "gpu": ctx["gpu"],
        "timings": str(timings),
    }
    cmd = [sys.executable, str(script), json.dumps(settings)]
    run = run_process(spec, cmd, ctx["env"], ctx["logs"] / f"{_slug(spec)}.log", ctx["timeout"])
    marker = run["markers"][-1] if run["markers"] else {}
    first = marker.get("marks", {}).get("first_result")
    return _result(ctx, spec, run, marker.get("rows", 0), marker.get("tokens_out", 0), first, str(timings), {})


def run_ours(ctx: dict[str, Any], spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
    import yaml

    work = ctx["work"]
    output = work / f"{_slug(spec)}.output"
    model: dict[str, Any] = {
        "source": str(ctx["model"]),
        "id": "bench",
        "engine": "vllm",
        "engine_kwargs": {**ctx["engine_kwargs"], **{k: v for k, v in overrides.items() if k not in PROCESSOR_KEYS}},
    }
    if "batch_size" in overrides:
        model["batch_size"] = overrides["batch_size"]
    if "max_concurrent_batches" in overrides:
        model["processor_kwargs"] = {"max_concurrent_batches": overrides["max_concurrent_batches"]}
    config = {"input": str(ctx["requests"]), "output": str(output), "model": model, "max_error_rate": 0.05}
    config_path = work / f"{_slug(spec)}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config_path), "--overwrite", "--no-progress"]
    env = {**ctx["env"], "RAYLLM_RAY_LOGS": "1"}
    run = run_process(spec, cmd, env, ctx["logs"] / f"{_slug(spec)}.log", ctx["timeout"])
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    first = None
    if manifest:
        timings = manifest["timings"]
        first = timings["started_at"] + timings["first_result_s"] if timings.get("first_result_s") is not None else None
    result = _result(
        ctx,
        spec,
        run,
        (manifest.get("counts") or {}).get("completed", 0),
        (manifest.get("throughput") or {}).get("tokens_out", 0),
        first,
        None,
        {},
        (manifest.get("engine") or {}).get("batch"),
    )
    result["manifest_timings"] = manifest.get("timings")
    return result


# -- what each run says ---------------------------------------------------------------------------


def _result(
    ctx: dict[str, Any],
    spec: str,
    run: dict[str, Any],
    rows: int,
    tokens: int,
    first_result_at: float | None,
    timings_path: str | None,
    capacity: dict[str, Any],
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    launched = run["launched_at"]
    result: dict[str, Any] = {
        "system": spec,
        "ok": run["returncode"] == 0 and rows == ctx["requests_count"],
        "returncode": run["returncode"],
        "timed_out": run["timed_out"],
        "rows": rows,
        "tokens_out": tokens,
        "wall_s": run["wall_s"],
        "first_result_s": round(first_result_at - launched, 2) if first_result_at else None,
        "tokens_per_s_incl_start": round(tokens / run["wall_s"], 1) if run["wall_s"] else 0.0,
        "log": run["log"],
        "tail": run["tail"] if run["returncode"] != 0 else [],
        "capacity": capacity,
    }
    log_kv = [
        int(m.group(1).replace(",", ""))
        for _, line in run["stats_lines"]
        if (m := re.search(r"KV cache size: ([\d,]+) tokens", line))
    ]
    result["kv_tokens_from_log"] = log_kv[0] if log_kv else None
    stats = []
    for at, line in run["stats_lines"]:
        found = re.search(r"Running: (\d+) reqs, Waiting: (\d+) reqs.*?KV cache usage: ([\d.]+)%", line)
        if found:
            stats.append([round(at, 1), int(found.group(1)), int(found.group(2)), float(found.group(3))])
    result["vllm_log_stats"] = stats  # [s since launch, running, waiting, KV %] from vLLM's own log lines
    if timings_path and Path(timings_path).exists():
        result["engine"] = engine_summary(ctx, json.loads(Path(timings_path).read_text()), capacity, result["kv_tokens_from_log"])
        result["engine_source"] = "per-request vLLM timings"
    if engine:
        result["engine"] = engine
        result["engine_source"] = "manifest (our per-request engine timings)"
    engine = result.get("engine")
    window = None
    if engine and engine.get("first_request_at"):
        result["engine_first_request_s"] = round(engine["first_request_at"] - launched, 2)
        lo, hi = engine["steady_window_s"]
        window = (engine["first_request_at"] - launched + lo, engine["first_request_at"] - launched + hi)
    result["gpu_busy_pct"] = _gpu_busy(run["gpu"], window)
    result["gpu_memory_gib_max"] = max((g[2] for g in run["gpu"]), default=None)
    result["cpu_top"] = _cpu_top(run["cpu"], window)
    return result


def engine_summary(ctx: dict[str, Any], timings: list, capacity: dict[str, Any], kv_from_log: int | None) -> dict[str, Any]:
    """The same EngineTrace summary and roofline `rayllm batch` writes into its manifest."""
    from prefect_rayllm.rayllm_stages.llm.capacity import read_model_shape
    from prefect_rayllm.rayllm_stages.runtime.engine_stats import EngineTrace, decode_roofline, efficiency, engine_timing

    trace = EngineTrace()
    for metrics, prompt_tokens, output_tokens in timings:
        timing = engine_timing(metrics)
        if timing is not None:
            trace.add_timing(timing, prompt_tokens, output_tokens)
    trace.max_num_seqs = trace.max_num_seqs or capacity.get("max_num_seqs")
    trace.kv_capacity = trace.kv_capacity or capacity.get("kv_tokens") or kv_from_log
    summary = trace.summary()
    shape = read_model_shape(str(ctx["model"]), ctx["engine_kwargs"])
    accelerator = ctx["accelerator"]
    roofline = None
    if shape and accelerator and summary.get("context_tokens_mean"):
        roofline = decode_roofline(shape, accelerator, summary["running"]["mean"], summary["context_tokens_mean"])
    summary["roofline"], summary["roofline_efficiency"] = roofline, efficiency(summary, roofline)
    return summary


def _gpu_busy(samples: list, window: tuple[float, float] | None) -> dict[str, float | None]:
    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 1) if values else None

    steady = [busy for at, busy, _ in samples if window and window[0] <= at <= window[1]]
    return {"run": mean([busy for _, busy, _ in samples]), "steady": mean(steady)}


def _cpu_top(samples: list, window: tuple[float, float] | None, top: int = 6) -> list[list[Any]]:
    chosen = [usage for at, usage in samples if window is None or window[0] <= at <= window[1]] or [u for _, u in samples]
    totals: dict[str, float] = {}
    for usage in chosen:
        for name, value in usage.items():
            totals[name] = totals.get(name, 0.0) + value
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [[name, round(total / max(1, len(chosen)), 1)] for name, total in ranked]


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


# -- the table ------------------------------------------------------------------------------------


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Ratios of output tokens/s (incl. start) and steady decode tokens/s against the plain `vllm`
    run, and of steady decode against the vllm run with the same max_num_seqs (the engine driven
    directly at the same settings)."""
    reference = next((r for r in results if r["system"] == "vllm" and r["ok"]), None)
    vllm_runs = [r for r in results if r["system"].startswith("vllm") and r["ok"] and r.get("engine")]
    for result in results:
        engine = result.get("engine") or {}
        steady = engine.get("decode_tokens_per_s")
        if reference and reference.get("tokens_per_s_incl_start"):
            result["ratio_incl_start_vs_run_batch"] = round(
                result["tokens_per_s_incl_start"] / reference["tokens_per_s_incl_start"], 3
            )
            ref_steady = (reference.get("engine") or {}).get("decode_tokens_per_s")
            if steady and ref_steady:
                result["ratio_steady_vs_run_batch"] = round(steady / ref_steady, 3)
        seqs = (engine.get("running") or {}).get("max_num_seqs")
        same = next((r for r in vllm_runs if (r["engine"].get("running") or {}).get("max_num_seqs") == seqs), None)
        if same and steady and seqs:
            result["steady_vs_engine_direct"] = {
                "run": same["system"],
                "ratio": round(steady / same["engine"]["decode_tokens_per_s"], 3),
            }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| system | ok | wall s | first result s | engine's first request s | output tok/s incl. start | steady decode tok/s "
        "| running mean / max (max_num_seqs) | waiting mean | KV use mean / max | roofline tok/s (eff.) | GPU busy % steady "
        "| vs run_batch incl. start | vs run_batch steady | vs engine direct, same max_num_seqs |"
    )
    lines = [head, "|" + " --- |" * 15]
    for r in results:
        e = r.get("engine") or {}
        running, kv, roof = e.get("running") or {}, e.get("kv_cache") or {}, e.get("roofline") or {}
        direct = r.get("steady_vs_engine_direct") or {}
        kv_text = f"{100 * kv['use_mean']:.1f}% / {100 * kv['use_max']:.1f}%" if kv.get("use_mean") is not None else "-"
        roof_text = (
            f"{roof['tokens_per_s']:,.0f} ({100 * e['roofline_efficiency']:.0f}%)"
            if roof and e.get("roofline_efficiency")
            else "-"
        )
        lines.append(
            f"| `{r['system']}` | {'yes' if r['ok'] else 'NO'} | {r['wall_s']} | {_fmt(r.get('first_result_s'))} "
            f"| {_fmt(r.get('engine_first_request_s'))} | {r['tokens_per_s_incl_start']:,.0f} | {_fmt(e.get('decode_tokens_per_s'), ',.0f')} "
            f"| {_fmt(running.get('mean'))} / {_fmt(running.get('max'))} ({_fmt(running.get('max_num_seqs'))}) "
            f"| {_fmt((e.get('waiting') or {}).get('mean'))} | {kv_text} | {roof_text} | {_fmt((r.get('gpu_busy_pct') or {}).get('steady'))} "
            f"| {_fmt(r.get('ratio_incl_start_vs_run_batch'))} | {_fmt(r.get('ratio_steady_vs_run_batch'))} "
            f"| {_fmt(direct.get('ratio'))}{' (`' + direct['run'] + '`)' if direct.get('run') else ''} |"
        )
    return "\n".join(lines)


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def render_readme(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        README_START,
        f"### `gpu_bench.py` on {hw.get('gpu') or 'no GPU'} ({report['started']})",
        "",
        *[
            f"Command: `{command}`  "
            for command in ([report["command"]] if isinstance(report["command"], str) else report["command"])
        ],
        f"Hardware: {hw.get('gpu')} x{hw.get('gpus')}, {hw.get('gpu_memory_gib')} GiB, driver {hw.get('driver')}; "
        f"{hw.get('cpus')} CPU cores; Python {hw.get('python')}; {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}  ",
        f"Workload: {report['workload']}  ",
        f"Engine settings (all systems): `{json.dumps(report['engine_kwargs'])}`; overrides per system in its name.",
        "",
        table(report["results"]),
        "",
        *[f"- {note}" for note in report.get("notes", [])],
        *([""] if report.get("notes") else []),
        "Steady decode tok/s: the engine's generated tokens from 10% to 90% of the run's total, from vLLM's own "
        "per-request timings (run_batch: a wrapper keeps each finished request's timings; raw: Ray's `metrics` "
        "column; ours: the manifest's `engine` section). Running / waiting / KV use: the same timings, over that "
        "window. Roofline: weights plus the running requests' KV cache read once per decode step at the card's "
        "datasheet bandwidth. GPU busy: NVML utilisation in that window.",
        README_END,
    ]
    return "\n".join(lines)


def write_readme(report: dict[str, Any]) -> None:
    readme = REPO / "bench" / "README.md"
    text = readme.read_text()
    block = render_readme(report)
    if README_START in text and README_END in text:
        text = text[: text.index(README_START)] + block + text[text.index(README_END) + len(README_END) :]
    else:
        text = text.rstrip("\n") + "\n\n## `gpu_bench.py`: measured on a GPU\n\n" + block + "\n"
    readme.write_text(text)


# -- main -----------------------------------------------------------------------------------------


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            rows = [line.split(", ") for line in out.splitlines() if line.strip()]
            if rows:
                info.update(gpu=rows[0][0], gpus=len(rows), gpu_memory_gib=round(float(rows[0][1]) / 1024, 1), driver=rows[0][2])
        except Exception:
            pass
    return info


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in ("vllm", "ray", "torch", "prefect", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="vllm,ours,raw", help="comma-separated; each vllm|raw|ours[+key=value...]")
    parser.add_argument("--requests", type=int, default=4096)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--shape", default="llama-3.1-8b", help="a shaped_models.SHAPES key, or tiny")
    parser.add_argument(
        "--engine-kwargs", default='{"max_model_len": 1024, "gpu_memory_utilization": 0.85, "load_format": "dummy"}'
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 requests x 16 tokens (CPU or GPU)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per system")
    parser.add_argument("--tag", default=None, help="results file: bench/results/gpu-<tag>.json")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--report", default=None, help="render this results file instead of running")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()

    shim = package_path()
    if args.report:
        report = json.loads(Path(args.report).read_text())
        add_ratios(report["results"])
        print(table(report["results"]))
        if args.readme:
            write_readme(report)
        return

    from prefect_rayllm.rayllm_stages.llm.capacity import detect_accelerator

    accelerator = detect_accelerator()
    gpu = accelerator is not None
    engine_kwargs = json.loads(args.engine_kwargs)
    if args.smoke:
        args.shape, args.requests, args.max_tokens, args.words = "tiny", min(args.requests, 64), 16, 30
        engine_kwargs = {"max_model_len": 1024, "gpu_memory_utilization": 0.04 if not gpu else 0.3}
    tag = args.tag or ("smoke-" if args.smoke else "") + time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="disabled",
        VLLM_USE_FLASHINFER_SAMPLER=env.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
        VLLM_LOGGING_LEVEL="INFO",
        VLLM_LOG_STATS_INTERVAL="2",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        RAYLLM_CACHE_DIR=str(work / "rayllm-cache"),
    )
    if shim:
        env["PYTHONPATH"] = shim + os.pathsep + env.get("PYTHONPATH", "")
    started = time.time()
    model = build_model(args.shape, work / "model")
    requests = work / "requests.jsonl"
    write_requests(requests, args.requests, args.words, args.max_tokens)
    print(
        f"model {args.shape} at {model} ({time.time() - started:.1f} s); {args.requests} requests; accelerator {accelerator}",
        flush=True,
    )
    ctx = {
        "work": work,
        "logs": out_dir / f"gpu-{tag}-logs",
        "model": model,
        "requests": requests,
        "requests_count": args.requests,
        "engine_kwargs": engine_kwargs,
        "env": env,
        "gpu": gpu,
        "accelerator": accelerator,
        "timeout": args.timeout,
    }
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:]),
        "hardware": hardware(),
        "versions": versions(),
        "workload": f"{args.requests} OpenAI Batch chat requests of about {args.words} words, exactly {args.max_tokens} tokens out "
        f"(min_tokens = max_tokens), model shape {args.shape}",
        "engine_kwargs": engine_kwargs,
        "accelerator": accelerator.__dict__ if accelerator else None,
        "results": [],
    }
    runners = {"vllm": run_vllm, "raw": run_raw, "ours": run_ours}
    path = out_dir / f"gpu-{tag}.json"
    for spec in [s.strip() for s in args.systems.split(",") if s.strip()]:
        kind, overrides = parse_system(spec)
        print(f"--- {spec}", flush=True)
        try:
            result = runners[kind](ctx, spec, overrides)
        except Exception as exc:  # record it and go on with the next system
            result = {
                "system": spec,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "wall_s": 0,
                "tokens_per_s_incl_start": 0,
            }
        report["results"].append(result)
        add_ratios(report["results"])
        path.write_text(json.dumps(report, indent=1, default=str))
        engine = result.get("engine") or {}
        print(
            f"{spec}: ok={result['ok']} wall={result['wall_s']} s first={result.get('first_result_s')} s "
            f"tok/s incl start={result.get('tokens_per_s_incl_start')} steady={engine.get('decode_tokens_per_s')} "
            f"running={engine.get('running')} kv={(engine.get('kv_cache') or {}).get('use_mean')} "
            f"gpu={result.get('gpu_busy_pct')} cpu={result.get('cpu_top')}",
            flush=True,
        )
        if not result["ok"]:
            print("\n".join(result.get("tail") or [result.get("error", "")]), flush=True)
    print(f"\nresults: {path}\n")
    print(table(report["results"]))
    if args.readme:
        write_readme(report)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
