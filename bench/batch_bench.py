"""Batch inference benchmark: our `rayllm batch` flow vs raw Ray Data LLM vs vLLM's run_batch.

One command, three systems over the same OpenAI Batch JSONL file, each in a fresh subprocess
(its own Ray / vLLM engine; engine start is part of the measurement), run one after another:

    (a) ours : .venv/bin/rayllm batch CONFIG.yaml --no-progress --overwrite
    (b) peer : ray.data.llm.build_processor + vLLMEngineProcessorConfig, rows iterated in the driver
    (c) vllm : vLLM's single-process OpenAI batch runner (vllm.entrypoints.launchers.run_batch)

Then, unless --skip-rss, a large file (default 100,000 requests, max_tokens 1) goes through (a)
while the driver process's own RSS is sampled every 0.5 s.

Usage:
    .venv/bin/python bench/batch_bench.py [--rows 2000] [--max-tokens 16] [--rss-rows 100000] [--skip-rss]

Definitions (printed with the table and written to bench/results/batch.{json,md}):
    wall      = subprocess launch -> subprocess exit, measured by this script.
    start-up  = subprocess launch -> first result available in the process that collects results
                (a: the flow's first result row, b: the first row out of iter_rows,
                 c: the first request completed by the engine client).
    steady    = wall - start-up.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = REPO / ".venv" / "bin" / "python"
RAYLLM = REPO / ".venv" / "bin" / "rayllm"
SAMPLE_EVERY_S = 0.5
MARKER = "BENCH_JSON "
LINGER_S = 10.0  # how long a run's processes may outlive it before the harness kills them

# Same engine and sampling settings in all three systems.
MAX_MODEL_LEN = 256
GPU_MEMORY_UTILIZATION = 0.1  # vLLM CPU: share of host RAM for the KV cache
CONCURRENCY = 1
BATCH_SIZE = 32
NUM_CPUS = 8  # logical CPUs for a local Ray on a 2-core box (see /work/shared/STACK.md)

# --------------------------------------------------------------------------------------------
# Helper scripts, written into the work dir at run time and run with the venv's python.
# --------------------------------------------------------------------------------------------

RAW_RAY_DATA_LLM = r'''
"""(b) Raw Ray Data LLM: read_json -> build_processor(vLLM) -> rows iterated in the driver."""
import json, sys, time

MARKER = "BENCH_JSON "


def main():
    input_path, model, out_path, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    marks = {"script_start": time.time()}
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(num_cpus=%(num_cpus)d, include_dashboard=False, log_to_driver=False)
    marks["ray_ready"] = time.time()
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(max_model_len=%(max_model_len)d, gpu_memory_utilization=%(gpu_mem)r),
        concurrency=%(concurrency)d,
        batch_size=%(batch_size)d,
        placement_group_config=dict(bundles=[{"CPU": 1}]),
    )

    def preprocess(row):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["body"]["messages"]]
        return dict(messages=messages, sampling_params=dict(temperature=0.0, max_tokens=max_tokens))

    def postprocess(row):
        return dict(
            custom_id=row["custom_id"],
            generated_text=row.get("generated_text") or "",
            num_input_tokens=int(row.get("num_input_tokens") or 0),
            num_generated_tokens=int(row.get("num_generated_tokens") or 0),
        )

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    dataset = processor(ray.data.read_json(input_path))
    rows = tokens_out = tokens_in = 0
    ids = set()
    with open(out_path, "w") as out:
        for row in dataset.iter_rows():
            if rows == 0:
                marks["first_result"] = time.time()
            rows += 1
            ids.add(row["custom_id"])
            tokens_out += row["num_generated_tokens"]
            tokens_in += row["num_input_tokens"]
            out.write(json.dumps(row) + "\n")
    marks["last_result"] = time.time()
    ray.shutdown()
    marks["end"] = time.time()
    print(MARKER + json.dumps({"marks": marks, "rows": rows, "unique_ids": len(ids),
                               "tokens_out": tokens_out, "tokens_in": tokens_in}), flush=True)


if __name__ == "__main__":
    main()
'''

# vLLM's `python -m vllm.entrypoints.openai.run_batch` is exactly `parse_args()` +
# `asyncio.run(main(args))` from vllm.entrypoints.launchers.run_batch. This runs the same two calls,
# with two timestamps hooked in: engine ready (run_batch() entered: the engine client exists) and
# the first completed request. Nothing else changes.
VLLM_RUN_BATCH_TIMED = r'''
"""(c) vLLM's OpenAI batch runner, with timestamps for engine-ready and first completed request."""
import asyncio, json, time

MARKER = "BENCH_JSON "


def main():
    marks = {"script_start": time.time()}
    import vllm.entrypoints.launchers.run_batch as rb

    original_completed = rb.BatchProgressTracker.completed
    original_run_batch = rb.run_batch

    def completed(self):
        now = time.time()
        marks.setdefault("first_result", now)
        marks["last_result"] = now
        return original_completed(self)

    async def run_batch(engine_client, args):
        marks["engine_ready"] = time.time()
        result = await original_run_batch(engine_client, args)
        marks["output_written"] = time.time()
        return result

    rb.BatchProgressTracker.completed = completed
    rb.run_batch = run_batch
    args = rb.parse_args()
    asyncio.run(rb.main(args))
    marks["end"] = time.time()
    print(MARKER + json.dumps({"marks": marks}), flush=True)


if __name__ == "__main__":
    main()
'''


# --------------------------------------------------------------------------------------------
# Running one subprocess: wall clock, its output, driver RSS, and no leftovers.
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    returncode: int | None = None
    launched_at: float = 0.0
    wall_s: float = 0.0
    timed_out: bool = False
    markers: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s since launch, rss, shared) bytes
    load_samples: list[float] = field(default_factory=list)  # 1-minute load average while it ran
    descendants_seen: int = 0
    alive_1s_after_exit: list[str] = field(default_factory=list)
    leftovers_killed: list[str] = field(default_factory=list)  # still alive LINGER_S after the exit
    log_path: str = ""


_ACTIVE: dict[int, subprocess.Popen] = {}
_TRACKED: dict[int, float] = {}  # pid -> create_time of every descendant seen of the active run


def _kill_tracked(procs: dict[int, float], sig: int = signal.SIGKILL) -> list[str]:
    """Kill the given processes (pid -> create_time) that are still alive; returns "pid name" of each."""
    victims, names = [], []
    for pid, created in procs.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.5:  # pid reused by someone else
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            name = f"{pid} {(' '.join(proc.cmdline()) or proc.name())[:80].strip()}"
            proc.send_signal(sig)
            victims.append(proc)
            names.append(name)
        except psutil.Error:
            continue
    psutil.wait_procs(victims, timeout=10)
    return names


def _alive_names(procs: dict[int, float]) -> list[str]:
    names = []
    for pid, created in procs.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= 0.5 and proc.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{pid} {(' '.join(proc.cmdline()) or proc.name())[:80].strip()}")
        except psutil.Error:
            continue
    return names


def cleanup_active() -> None:
    for proc in list(_ACTIVE.values()):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    _kill_tracked(dict(_TRACKED))
    _ACTIVE.clear()
    _TRACKED.clear()


def follow_output(proc: subprocess.Popen, log, started: float, run: Any, tail_lines: int) -> threading.Thread:
    """A thread that copies `proc`'s output into `log` (time-stamped), collects its MARKER lines
    into `run.markers` and keeps about its last `tail_lines` lines in `run.tail`."""

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(f"[{time.monotonic() - started:8.2f}] {line}")
            if line.startswith(MARKER):
                try:
                    run.markers.append(json.loads(line[len(MARKER) :]))
                except json.JSONDecodeError:
                    pass
            run.tail.append(line.rstrip("\n"))
            if len(run.tail) > tail_lines:
                del run.tail[:20]

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread


def run_subprocess(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    cwd: Path | None = None,
) -> Run:
    """Run `cmd` in its own session; time it, keep its output in `log_path`, reap what it leaves."""
    run = Run(name=name, log_path=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w", encoding="utf-8", errors="replace")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    run.launched_at = time.time()
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(cwd or REPO),
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )
    _ACTIVE[proc.pid] = proc
    seen: dict[int, float] = {}
    try:
        seen[proc.pid] = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        pass
    _TRACKED.clear()
    _TRACKED.update(seen)

    thread = follow_output(proc, log, started, run, tail_lines=60)
    try:
        driver = psutil.Process(proc.pid)
    except psutil.Error:
        driver = None
    try:
        while proc.poll() is None:
            now = time.monotonic() - started
            if now > timeout_s:
                run.timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            run.load_samples.append(os.getloadavg()[0])
            if driver is not None:
                try:
                    mem = driver.memory_info()  # every run: the driver's own RSS (cheap)
                    run.rss_samples.append((round(now, 2), mem.rss, getattr(mem, "shared", 0)))
                    for child in driver.children(recursive=True):
                        try:
                            seen.setdefault(child.pid, child.create_time())
                        except psutil.Error:
                            continue
                    _TRACKED.update(seen)
                except psutil.Error:
                    pass
            try:
                proc.wait(timeout=SAMPLE_EVERY_S)  # returns at once when it exits: wall is exact
            except subprocess.TimeoutExpired:
                pass
        proc.wait()
        run.wall_s = time.monotonic() - started
        run.returncode = proc.returncode
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) or failed while it ran: stop it first
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        thread.join(timeout=10)
        _ACTIVE.pop(proc.pid, None)
        seen.pop(proc.pid, None)
        # Whatever the run started and left behind (Ray GCS/raylet/workers, vLLM EngineCore): note what
        # is still alive 1 s after the exit, give it LINGER_S to go away by itself, then kill it.
        exited = time.monotonic()
        time.sleep(1.0)
        run.alive_1s_after_exit = _alive_names(seen)
        while _alive_names(seen) and time.monotonic() - exited < LINGER_S:
            time.sleep(0.5)
        run.leftovers_killed = _kill_tracked(seen)
        run.descendants_seen = len(seen)
        _TRACKED.clear()
        log.write(
            f"# exit {run.returncode} after {run.wall_s:.2f} s; alive 1 s after exit: {run.alive_1s_after_exit}; "
            f"killed {LINGER_S:.0f} s after exit: {run.leftovers_killed}\n"
        )
        log.close()
    return run


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "teal", "orange", "purple", "yellow", "grey", "black", "white"]
TEMPLATES = [
    "Is {c} warm or cool?",
    "Name one thing that is {c}.",
    "Describe the colour {c} in one word.",
    "Translate {c} to French, please.",
    "What rhymes with {c}? Give two words.",
    "Write a short line about a {c} house, number {i}.",
    "Count from {i} to {j} and stop.",
    "Say hello to user {i} who likes {c}.",
]


def write_requests(path: Path, rows: int, max_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            template = rng.choice(TEMPLATES)
            content = template.format(c=rng.choice(COLOURS), i=i, j=i + rng.randint(1, 9))
            record = {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                },
            }
            out.write(json.dumps(record) + "\n")


def write_config(path: Path, input_path: Path, output: Path, model: Path, max_tokens: int) -> None:
    import yaml

    config = {
        "input": str(input_path),
        "output": str(output),
        "model": {
            "source": str(model),
            "id": "tiny",
            "engine": "vllm",
            "engine_kwargs": {"max_model_len": MAX_MODEL_LEN},
            "concurrency": CONCURRENCY,
            "batch_size": BATCH_SIZE,
        },
        "sampling": {"temperature": 0.0, "max_tokens": max_tokens},
        "max_error_rate": 0.05,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="60",
        PYTHONUNBUFFERED="1",
        # The CLI sets this itself (setdefault); the same for the other two keeps logging equal.
        VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    )
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------------------------
# The three systems.
# --------------------------------------------------------------------------------------------


def _failure(run: Run, what: str) -> dict[str, Any]:
    return {
        "ok": False,
        "error": what,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "wall_s": round(run.wall_s, 3),
        "load_avg_1m_during": _load(run),
        "driver_peak_rss_mib": _peak_rss_mib(run),
        "log": run.log_path,
        "tail": run.tail[-25:],
    }


def run_ours(
    work: Path, requests: Path, model: Path, max_tokens: int, rows: int, logs: Path, tag: str, timeout_s: float
) -> tuple[dict[str, Any], Run]:
    output = work / f"out-ours-{tag}"
    config = work / f"ours-{tag}.yaml"
    write_config(config, requests, output, model, max_tokens)
    cmd = [str(RAYLLM), "batch", str(config), "--no-progress", "--overwrite"]
    run = run_subprocess(f"ours-{tag}", cmd, subprocess_env(), logs / f"ours-{tag}.log", timeout_s)
    manifest_path = output / "manifest.json"
    if run.returncode != 0 or not manifest_path.exists():
        return _failure(run, f"rayllm batch exited {run.returncode}; manifest present: {manifest_path.exists()}"), run
    manifest = json.loads(manifest_path.read_text())
    timings = manifest.get("timings", {})
    throughput = manifest.get("throughput", {})
    counts = manifest.get("counts", {})
    first_result_s = timings.get("first_result_s")
    started_at = timings.get("started_at")
    # started_at is when prepare() created the job (just before execute() starts), first_result_s
    # runs from execute()'s start: their sum is a lower bound of the first result's wall-clock time.
    startup = None
    if first_result_s is not None and started_at is not None:
        startup = started_at + first_result_s - run.launched_at
    window = None
    if first_result_s is not None and timings.get("wall_s") is not None:
        window = timings["wall_s"] - first_result_s  # execute start -> last commit, minus -> first result
    results_file = output / "results.jsonl"
    result_lines = _count_lines(results_file) if results_file.exists() else None
    return {
        "ok": True,
        "command": " ".join(cmd),
        "wall_s": round(run.wall_s, 3),
        "startup_s": round(startup, 3) if startup is not None else None,
        "first_to_last_s": round(window, 3) if window is not None else None,
        "rows": counts.get("total"),
        "rows_ok": counts.get("completed"),
        "rows_failed": counts.get("failed"),
        "expected_rows": rows,
        "results_lines": result_lines,
        "tokens_out": throughput.get("tokens_out"),
        "tokens_in": throughput.get("tokens_in"),
        "manifest_timings": timings,
        "manifest_throughput": throughput,
        "manifest_counts": counts,
        "manifest_attempts": manifest.get("attempts"),
        "alive_1s_after_exit": run.alive_1s_after_exit,
        "leftovers_killed": run.leftovers_killed,
        "load_avg_1m_during": _load(run),
        "driver_peak_rss_mib": _peak_rss_mib(run),
        "log": run.log_path,
    }, run


def run_peer(
    work: Path, requests: Path, model: Path, max_tokens: int, rows: int, logs: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    script = work / "raw_ray_data_llm.py"
    script.write_text(
        RAW_RAY_DATA_LLM
        % dict(
            num_cpus=NUM_CPUS,
            max_model_len=MAX_MODEL_LEN,
            gpu_mem=GPU_MEMORY_UTILIZATION,
            concurrency=CONCURRENCY,
            batch_size=BATCH_SIZE,
        )
    )
    out = work / f"out-peer-{tag}.jsonl"
    cmd = [str(PYTHON), str(script), str(requests), str(model), str(out), str(max_tokens)]
    run = run_subprocess(f"peer-{tag}", cmd, subprocess_env(), logs / f"peer-{tag}.log", timeout_s)
    if run.returncode != 0 or not run.markers:
        return _failure(run, f"raw Ray Data LLM script exited {run.returncode}")
    data = run.markers[-1]
    marks = data["marks"]
    startup = marks["first_result"] - run.launched_at if "first_result" in marks else None
    window = marks["last_result"] - marks["first_result"] if "first_result" in marks else None
    return {
        "ok": True,
        "command": " ".join(cmd),
        "wall_s": round(run.wall_s, 3),
        "startup_s": round(startup, 3) if startup is not None else None,
        "first_to_last_s": round(window, 3) if window is not None else None,
        "rows": data["rows"],
        "rows_ok": data["rows"],
        "rows_failed": rows - data["rows"],
        "expected_rows": rows,
        "unique_ids": data["unique_ids"],
        "tokens_out": data["tokens_out"],
        "tokens_in": data["tokens_in"],
        "marks_rel_launch_s": {k: round(v - run.launched_at, 3) for k, v in marks.items()},
        "alive_1s_after_exit": run.alive_1s_after_exit,
        "leftovers_killed": run.leftovers_killed,
        "load_avg_1m_during": _load(run),
        "driver_peak_rss_mib": _peak_rss_mib(run),
        "log": run.log_path,
    }


def run_vllm(
    work: Path, requests: Path, model: Path, max_tokens: int, rows: int, logs: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    script = work / "vllm_run_batch_timed.py"
    script.write_text(VLLM_RUN_BATCH_TIMED)
    out = work / f"out-vllm-{tag}.jsonl"
    cmd = [
        str(PYTHON),
        str(script),
        "-i",
        str(requests),
        "-o",
        str(out),
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--gpu-memory-utilization",
        str(GPU_MEMORY_UTILIZATION),
    ]
    run = run_subprocess(f"vllm-{tag}", cmd, subprocess_env(), logs / f"vllm-{tag}.log", timeout_s)
    if run.returncode != 0 or not out.exists():
        return _failure(run, f"vLLM run_batch exited {run.returncode}; output present: {out.exists()}")
    ok = failed = tokens_out = tokens_in = 0
    with open(out, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            response = record.get("response") or {}
            body = response.get("body") or {}
            if record.get("error") or response.get("status_code", 200) != 200 or not body:
                failed += 1
                continue
            ok += 1
            usage = body.get("usage") or {}
            tokens_out += int(usage.get("completion_tokens") or 0)
            tokens_in += int(usage.get("prompt_tokens") or 0)
    marks = run.markers[-1]["marks"] if run.markers else {}
    startup = marks["first_result"] - run.launched_at if "first_result" in marks else None
    window = marks["last_result"] - marks["first_result"] if "last_result" in marks else None
    return {
        "ok": True,
        "command": " ".join(cmd),
        "equivalent_to": "python -m vllm.entrypoints.openai.run_batch " + " ".join(cmd[3:]),
        "wall_s": round(run.wall_s, 3),
        "startup_s": round(startup, 3) if startup is not None else None,
        "first_to_last_s": round(window, 3) if window is not None else None,
        "rows": ok + failed,
        "rows_ok": ok,
        "rows_failed": failed,
        "expected_rows": rows,
        "tokens_out": tokens_out,
        "tokens_in": tokens_in,
        "marks_rel_launch_s": {k: round(v - run.launched_at, 3) for k, v in marks.items()},
        "alive_1s_after_exit": run.alive_1s_after_exit,
        "leftovers_killed": run.leftovers_killed,
        "load_avg_1m_during": _load(run),
        "driver_peak_rss_mib": _peak_rss_mib(run),
        "log": run.log_path,
    }


def _load(run: Run) -> dict[str, float | None]:
    samples = run.load_samples
    if not samples:
        return {"mean": None, "max": None}
    return {"mean": round(sum(samples) / len(samples), 2), "max": round(max(samples), 2)}


def _peak_rss_mib(run: Run) -> float | None:
    return round(max(rss for _, rss, _ in run.rss_samples) / 2**20, 1) if run.rss_samples else None


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

LABELS = {
    "ours": "(a) ours: rayllm batch (Prefect flow)",
    "peer": "(b) peer: raw Ray Data LLM",
    "vllm": "(c) vLLM run_batch (one process)",
}
DEFINITIONS = [
    "wall = subprocess launch -> exit, timed by the harness (interpreter, imports, Prefect server, Ray, "
    "engine start, inference, writing outputs, shutdown).",
    "start-up = subprocess launch -> first result available: (a) the flow's first result row in the "
    "driver (manifest timings.started_at + timings.first_result_s, a slight lower bound), (b) the first "
    "row out of Dataset.iter_rows(), (c) the first request completed by vLLM's engine client.",
    "steady = wall - start-up (start excluded; still holds writing the outputs and process shutdown). "
    "rows/s and tokens/s divide rows / output tokens by wall or steady.",
    "first->last = first result -> last result (a: manifest timings.wall_s - timings.first_result_s, i.e. "
    "to the last committed part; b: last row out of iter_rows; c: last request completed), shown for "
    "information: the pure inference window, without start-up, output merge or shutdown.",
    "ratio = seconds of (a) / seconds of the peer: above 1 means ours took longer.",
]


def derive(result: dict[str, Any]) -> None:
    if not result.get("ok"):
        return
    wall = result["wall_s"]
    startup = result.get("startup_s")
    steady = wall - startup if startup is not None else None
    result["steady_s"] = round(steady, 3) if steady is not None else None
    rows = result.get("rows_ok") or 0
    tokens = result.get("tokens_out") or 0
    result["rows_per_s"] = round(rows / wall, 2) if wall else None
    result["tokens_per_s"] = round(tokens / wall, 2) if wall else None
    result["rows_per_s_steady"] = round(rows / steady, 2) if steady else None
    result["tokens_per_s_steady"] = round(tokens / steady, 2) if steady else None


MEDIAN_KEYS = ("wall_s", "startup_s", "first_to_last_s", "driver_peak_rss_mib")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result per system: the only run, or per-metric medians of the successful runs."""
    good = [r for r in runs if r.get("ok")]
    if len(runs) == 1 or not good:
        result = dict(runs[-1] if not good else good[0])
        result["repeats"] = len(runs)
        return result
    result = dict(good[len(good) // 2])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in good if r.get(key) is not None]
        result[key] = round(statistics.median(values), 3) if values else None
    derive(result)
    result["steady_s"] = round(statistics.median([r["steady_s"] for r in good if r.get("steady_s") is not None]), 3)
    rows, tokens = result.get("rows_ok") or 0, result.get("tokens_out") or 0
    result["rows_per_s_steady"] = round(rows / result["steady_s"], 2) if result["steady_s"] else None
    result["tokens_per_s_steady"] = round(tokens / result["steady_s"], 2) if result["steady_s"] else None
    result["repeats"] = len(runs)
    result["failed_repeats"] = len(runs) - len(good)
    result["aggregate"] = "median per metric over successful repeats"
    result["runs"] = [
        {
            k: r.get(k)
            for k in (
                "ok",
                "wall_s",
                "startup_s",
                "steady_s",
                "first_to_last_s",
                "rows_ok",
                "tokens_out",
                "load_avg_1m_during",
                "driver_peak_rss_mib",
                "alive_1s_after_exit",
                "leftovers_killed",
                "log",
                "error",
            )
        }
        for r in runs
    ]
    return result


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ours = results.get("ours", {})
    for peer in ("peer", "vllm"):
        other = results.get(peer, {})
        if not (ours.get("ok") and other.get("ok")):
            continue
        entry = {"wall_incl_start": round(ours["wall_s"] / other["wall_s"], 3)}
        if ours.get("steady_s") and other.get("steady_s"):
            entry["steady_excl_start"] = round(ours["steady_s"] / other["steady_s"], 3)
        out[f"ours/{peer}"] = entry
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(results: dict[str, dict[str, Any]], ratio: dict[str, Any]) -> str:
    header = [
        "system",
        "rows ok/total",
        "out tokens",
        "wall s (incl. start)",
        "start-up s",
        "steady s (excl. start)",
        "first->last s",
        "rows/s incl.",
        "rows/s steady",
        "out tok/s incl.",
        "out tok/s steady",
        "driver peak RSS MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in ("ours", "peer", "vllm"):
        r = results.get(key)
        if r is None:
            continue
        if not r.get("ok"):
            lines.append(f"| {LABELS[key]} | FAILED: {r.get('error')} | " + " | ".join(["-"] * (len(header) - 2)) + " |")
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    LABELS[key],
                    f"{r.get('rows_ok')}/{r.get('rows')}",
                    _fmt(r.get("tokens_out")),
                    _fmt(r["wall_s"]),
                    _fmt(r.get("startup_s")),
                    _fmt(r.get("steady_s")),
                    _fmt(r.get("first_to_last_s")),
                    _fmt(r.get("rows_per_s")),
                    _fmt(r.get("rows_per_s_steady")),
                    _fmt(r.get("tokens_per_s")),
                    _fmt(r.get("tokens_per_s_steady")),
                    _fmt(r.get("driver_peak_rss_mib"), 0),
                ]
            )
            + " |"
        )
    text = "\n".join(lines)
    if ratio:
        text += "\n\n| ratio (seconds, ours / peer) | incl. start | excl. start |\n|---|---|---|\n"
        text += "\n".join(
            f"| {name} | {_fmt(v.get('wall_incl_start'), 3)} | {_fmt(v.get('steady_excl_start'), 3)} |"
            for name, v in ratio.items()
        )
    return text


def rss_summary(samples: list[tuple[float, int, int]], wall: float) -> dict[str, Any]:
    if not samples:
        return {}
    mib = 2**20

    def at(fraction: float) -> dict[str, float]:
        target = fraction * wall
        t, rss, shared = min(samples, key=lambda s: abs(s[0] - target))
        return {"t_s": t, "rss_mib": round(rss / mib, 1), "shared_mib": round(shared / mib, 1)}

    peak_t, peak, peak_shared = max(samples, key=lambda s: s[1])
    return {
        "samples": len(samples),
        "interval_s": SAMPLE_EVERY_S,
        "peak_rss_mib": round(peak / mib, 1),
        "peak_rss_gib": round(peak / 1024**3, 3),
        "peak_shared_mib": round(peak_shared / mib, 1),
        "peak_at_s": peak_t,
        "at_10pct": at(0.10),
        "at_50pct": at(0.50),
        "at_90pct": at(0.90),
        "under_2_gib": peak < 2 * 1024**3,
    }


# --------------------------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """The commit (a) ran, and whether the package files differed from it (others edit concurrently)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "rayllm_stages", "flows", "tasks")
    return {"commit": git("rev-parse", "--short", "HEAD"), "package_files_modified": dirty.splitlines() if dirty else []}


def build_model(path: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from prefect_rayllm.rayllm_stages.testing.tiny_models import build_tiny_chat_model

    return Path(build_tiny_chat_model(path, trained=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="requests in the comparison file")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens for every request")
    parser.add_argument("--rss-rows", type=int, default=100_000, help="requests in the RSS check (max_tokens 1)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the RSS check")
    parser.add_argument("--skip-compare", action="store_true", help="only the RSS check")
    parser.add_argument("--systems", default="ours,peer,vllm", help="which of ours,peer,vllm to run, in order")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measured rounds (systems interleaved); the table shows per-metric medians"
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the unmeasured 32-row run of each system (it fills vLLM's compile cache)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measured subprocess")
    parser.add_argument("--rss-timeout", type=float, default=3600, help="seconds for the RSS run")
    parser.add_argument("--keep-work", action="store_true", help="keep the temp work dir (inputs, outputs)")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(LABELS)
    if unknown:
        parser.error(f"unknown systems: {sorted(unknown)}")

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)  # `kill PID` cleans up like Ctrl-C
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "load_avg_at_start": os.getloadavg(),
        },
        "settings": {
            "rows": args.rows,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "max_model_len": MAX_MODEL_LEN,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "concurrency": CONCURRENCY,
            "batch_size": BATCH_SIZE,
            "ray_num_cpus_peer": NUM_CPUS,
            "warmup": not args.no_warmup,
            "repeat": args.repeat,
        },
        "definitions": DEFINITIONS,
        "code_at_start": code_version(),
    }
    exit_code = 0
    try:
        print(f"work dir: {work}", flush=True)
        model = RESULTS / "model"
        t = time.monotonic()
        build_model(model)
        print(f"model: {model} (built in {time.monotonic() - t:.1f} s)", flush=True)
        runners = {"ours": lambda *a: run_ours(*a)[0], "peer": run_peer, "vllm": run_vllm}

        if not args.skip_compare:
            requests = work / "requests.jsonl"
            write_requests(requests, args.rows, args.max_tokens)
            if not args.no_warmup:
                warm = work / "warmup.jsonl"
                write_requests(warm, 32, args.max_tokens, seed=1)
                report["warmup"] = {}
                for name in systems:
                    print(f"warm-up (not measured): {name} ...", flush=True)
                    r = runners[name](work, warm, model, args.max_tokens, 32, logs, "warmup", args.timeout)
                    report["warmup"][name] = {"ok": r.get("ok"), "wall_s": r.get("wall_s"), "error": r.get("error")}
                    print(f"  {name}: {'ok' if r.get('ok') else 'FAILED'} in {r.get('wall_s', 0):.1f} s", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            for round_no in range(1, args.repeat + 1):
                for name in systems:  # interleaved: a, b, c, a, b, c, ...
                    print(f"measuring {LABELS[name]} on {args.rows} rows (round {round_no}/{args.repeat}) ...", flush=True)
                    tag = "measure" if args.repeat == 1 else f"measure{round_no}"
                    r = runners[name](work, requests, model, args.max_tokens, args.rows, logs, tag, args.timeout)
                    derive(r)
                    runs[name].append(r)
                    if r.get("ok"):
                        print(
                            f"  wall {r['wall_s']:.1f} s, start-up {_fmt(r.get('startup_s'))} s, "
                            f"first->last {_fmt(r.get('first_to_last_s'))} s, {r.get('rows_ok')} rows ok, "
                            f"{r.get('tokens_out')} output tokens; 1-min load average during the run "
                            f"{r['load_avg_1m_during']}; leftovers killed: {len(r.get('leftovers_killed') or [])}",
                            flush=True,
                        )
                    else:
                        exit_code = 1
                        print(f"  FAILED: {r.get('error')} (log {r.get('log')})", flush=True)
                        print("  " + "\n  ".join(r.get("tail", [])[-15:]), flush=True)
            results = {name: aggregate(name_runs) for name, name_runs in runs.items()}
            ratio = ratios(results)
            table = markdown_table(results, ratio)
            report["results"] = results
            report["ratios"] = ratio
            report["table_md"] = table
            print("\nDefinitions:\n- " + "\n- ".join(DEFINITIONS), flush=True)
            if "ours" in results and results["ours"].get("ok"):
                timings = results["ours"]["manifest_timings"]
                print(
                    f"- (a) manifest: timings.wall_s={timings.get('wall_s')} (execute attempts, inside the job), "
                    f"timings.first_result_s={timings.get('first_result_s')} (execute start -> first result)"
                )
            print("\n" + table + "\n", flush=True)

        if not args.skip_rss:
            rss_input = work / "rss-requests.jsonl"
            write_requests(rss_input, args.rss_rows, 1, seed=2)
            print(
                f"RSS check: {args.rss_rows} requests (max_tokens 1) through (a), "
                f"sampling the driver's RSS every {SAMPLE_EVERY_S} s ...",
                flush=True,
            )
            r, run = run_ours(work, rss_input, model, 1, args.rss_rows, logs, "rss", args.rss_timeout)
            summary = rss_summary(run.rss_samples, run.wall_s)
            summary.update(rss_during_inference(run, r.get("manifest_timings") or {}, args.rss_rows))
            rss_report = {
                "rows": args.rss_rows,
                "ok": r.get("ok"),
                "error": r.get("error"),
                "wall_s": round(run.wall_s, 3),
                "timed_out": run.timed_out,
                "load_avg_1m_during": _load(run),
                "driver_peak_rss_mib": _peak_rss_mib(run),
                "rows_ok": r.get("rows_ok"),
                "rows_failed": r.get("rows_failed"),
                "manifest_timings": r.get("manifest_timings"),
                **summary,
                "series_mib": [(t, round(b / 2**20, 1), round(sh / 2**20, 1)) for t, b, sh in run.rss_samples],
                "series_columns": ["seconds since launch", "rss MiB", "shared MiB (file-backed + shm, in rss)"],
            }
            report["rss"] = rss_report
            if not r.get("ok"):
                exit_code = 1
                print(f"  FAILED: {r.get('error')} (log {r.get('log')})", flush=True)
                print("  " + "\n  ".join(r.get("tail", [])[-15:]), flush=True)
            if summary:
                print(
                    f"  wall {run.wall_s:.1f} s, {r.get('rows_ok')} rows ok; driver RSS peak "
                    f"{summary['peak_rss_mib']} MiB at {summary['peak_at_s']} s; at 10% {summary['at_10pct']['rss_mib']}, "
                    f"50% {summary['at_50pct']['rss_mib']}, 90% {summary['at_90pct']['rss_mib']} MiB; "
                    f"under 2 GiB: {summary['under_2_gib']}",
                    flush=True,
                )
                if "inference" in summary:
                    inf = summary["inference"]
                    print(
                        f"  while rows flowed ({inf['from_s']} s -> {inf['to_s']} s): RSS {inf['rss_first_mib']} -> "
                        f"{inf['rss_last_mib']} MiB (min {inf['rss_min_mib']}, max {inf['rss_max_mib']}; "
                        f"{inf['growth_kib_per_1000_rows']} KiB per 1,000 rows)",
                        flush=True,
                    )
    except KeyboardInterrupt:
        exit_code = 130
        report["interrupted"] = True
        print("interrupted", flush=True)
    finally:
        cleanup_active()
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["code_at_end"] = code_version()
        report["machine"]["load_avg_at_end"] = os.getloadavg()
        # An interrupted run does not overwrite the last complete results.
        stem = "batch-interrupted" if report.get("interrupted") else "batch"
        if stem == "batch":
            _keep_skipped_sections(report, skipped_compare=args.skip_compare, skipped_rss=args.skip_rss)
        (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
        (RESULTS / f"{stem}.md").write_text(render_markdown(report))
        print(f"wrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.md')}", flush=True)
        if args.keep_work:
            print(f"kept work dir {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return exit_code


def rss_during_inference(run: Run, timings: dict[str, Any], rows: int) -> dict[str, Any]:
    """RSS between the first and the last result of (a): the part that grows with rows, if anything."""
    started, first, wall = timings.get("started_at"), timings.get("first_result_s"), timings.get("wall_s")
    if started is None or first is None or wall is None:
        return {}
    t0, t1 = started + first - run.launched_at, started + wall - run.launched_at
    inside = [(t, rss) for t, rss, _ in run.rss_samples if t0 <= t <= t1]
    if len(inside) < 2:
        return {}
    mib = 2**20
    growth = inside[-1][1] - inside[0][1]
    return {
        "inference": {
            "from_s": round(t0, 1),
            "to_s": round(t1, 1),
            "rss_first_mib": round(inside[0][1] / mib, 1),
            "rss_last_mib": round(inside[-1][1] / mib, 1),
            "rss_min_mib": round(min(v for _, v in inside) / mib, 1),
            "rss_max_mib": round(max(v for _, v in inside) / mib, 1),
            "growth_kib_per_1000_rows": round(growth / 1024 / max(rows, 1) * 1000, 2),
        }
    }


def _keep_skipped_sections(report: dict[str, Any], *, skipped_compare: bool, skipped_rss: bool) -> None:
    """A run that skips a section keeps that section from the previous batch.json, marked as such."""
    path = RESULTS / "batch.json"
    if not (skipped_compare or skipped_rss) or not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    keys = []
    if skipped_compare and "results" in previous:
        keys = ["results", "ratios", "table_md", "warmup"]
        report["compare_from_run"] = previous.get("compare_from_run") or {
            "started_at": previous.get("started_at"),
            "settings": previous.get("settings"),
            "machine": previous.get("machine"),
        }
    if skipped_rss and "rss" in previous:
        keys.append("rss")
        report["rss_from_run"] = previous.get("rss_from_run") or {"started_at": previous.get("started_at")}
    for key in keys:
        if key in previous:
            report[key] = previous[key]


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    parts = [
        f"# Batch benchmark ({report['started_at']})",
        "",
        f"{s['rows']} OpenAI Batch chat requests, temperature 0, max_tokens {s['max_tokens']}, tiny untrained Llama "
        f"(bench/results/model), vLLM CPU, max_model_len {s['max_model_len']}, gpu_memory_utilization "
        f"{s['gpu_memory_utilization']}, concurrency {s['concurrency']}, batch_size {s['batch_size']}. "
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['ram_gib']} GiB; load average at start "
        f"{tuple(round(x, 2) for x in report['machine']['load_avg_at_start'])}. Warm-up run per system: {s['warmup']}; "
        f"measured rounds: {s.get('repeat', 1)}. Code: {report.get('code_at_start')} at start, "
        f"{report.get('code_at_end')} at the end.",
        "",
        "Definitions:",
        *[f"- {d}" for d in report["definitions"]],
        "",
    ]
    if "table_md" in report:
        if report.get("compare_from_run"):
            parts += [
                f"(comparison from the run of {report['compare_from_run'].get('started_at')}, settings "
                f"{report['compare_from_run'].get('settings')})",
                "",
            ]
        parts += [report["table_md"], ""]
        rounds = []
        for key, result in (report.get("results") or {}).items():
            for i, r in enumerate(result.get("runs") or [result], 1):
                load = (r.get("load_avg_1m_during") or {}).get("mean")
                rounds.append(
                    f"- {LABELS.get(key, key)}, round {i}: "
                    + (
                        f"wall {_fmt(r.get('wall_s'))} s, start-up {_fmt(r.get('startup_s'))} s, "
                        f"first->last {_fmt(r.get('first_to_last_s'))} s"
                        if r.get("ok")
                        else f"FAILED ({r.get('error')})"
                    )
                    + f"; 1-min load average during it {_fmt(load)}"
                )
        if rounds:
            parts += ["Every round (the load average shows how busy the 2-core machine was):", "", *rounds, ""]
    rss = report.get("rss")
    if rss:
        parts += [
            f"## Driver RSS, {rss['rows']} requests (max_tokens 1) through (a)",
            "",
            *([f"(from the run of {report['rss_from_run'].get('started_at')})", ""] if report.get("rss_from_run") else []),
            f"ok: {rss.get('ok')}, wall {rss.get('wall_s')} s, rows ok {rss.get('rows_ok')}, "
            f"peak {rss.get('peak_rss_mib')} MiB at {rss.get('peak_at_s')} s, "
            f"10%: {rss.get('at_10pct')}, 50%: {rss.get('at_50pct')}, 90%: {rss.get('at_90pct')}, "
            f"under 2 GiB: {rss.get('under_2_gib')}; 1-min load average during it "
            f"{(rss.get('load_avg_1m_during') or {}).get('mean', '-')}",
            "",
        ]
        inference = rss.get("inference")
        if inference:
            parts += [
                f"While rows flowed ({inference['from_s']} s -> {inference['to_s']} s after launch): RSS "
                f"{inference['rss_first_mib']} -> {inference['rss_last_mib']} MiB (min {inference['rss_min_mib']}, "
                f"max {inference['rss_max_mib']}), {inference['growth_kib_per_1000_rows']} KiB per 1,000 rows.",
                "",
            ]
    return "\n".join(parts)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup_active()
