"""Scale benchmark (issue 14, part 4): a million OpenAI Batch requests through `rayllm batch` on a
local two-node Ray cluster, against raw Ray Data LLM on the same input through the same cluster.

The harness starts two `ray start` processes on this machine (a head, and a worker node joined with
`--address`), each with its own `--temp-dir`, then runs, one after the other, each in a fresh
subprocess that connects to that cluster:

    ours : .venv/bin/rayllm batch CONFIG.yaml --ray-address HEAD --no-progress --overwrite
    peer : ray.data.llm.build_processor(vLLMEngineProcessorConfig(...)) over ray.data.read_json,
           written back with Dataset.write_json from the workers

Every 0.5 s it samples the driver process (the `rayllm` process itself, or the peer's script) for
RSS and CPU seconds, and its children (the Prefect temporary server) separately; the machine's CPU
times before and after each run give the driver's share of all CPU used meanwhile. The cluster is
killed at the end, whatever happens (Ctrl-C and SIGTERM included), by its own processes only.

Usage:
    .venv/bin/python bench/scale_bench.py [--rows 1000000] [--peer-rows N] [--systems ours,peer] [--keep-work]

See bench/README.md ("scale_bench.py") for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from batch_bench import (
    GPU_MEMORY_UTILIZATION,
    MAX_MODEL_LEN,
    PYTHON,
    RAYLLM,
    REPO,
    RESULTS,
    SAMPLE_EVERY_S,
    build_model,
    code_version,
    follow_output,
    subprocess_env,
    write_requests,
)

from prefect_rayllm.rayllm_stages.runtime.cluster import session_processes

RAY = REPO / ".venv" / "bin" / "ray"
MIB = 2**20
GIB = 2**30

# One engine per node: each node offers one `bench_engine` resource and each engine's placement
# group asks for it, so the two engines land on the two nodes (two one-CPU bundles would otherwise
# both fit, and usually pack, on the head). Concurrency (2, 2), not 2: Ray Data LLM reads an int n
# as an autoscaling pool of 1..n, which on a small input never starts the second engine.
# 6 logical CPUs per node: the peer's default chat-template, tokenize and detokenize stages run as
# many one-CPU actors as there are engines, so its actors alone hold 8; with 4 per node the read
# task never got a CPU and the peer hung. 12 leave room for the read, the maps and the write.
NODES = 2
NODE_CPUS = 6
NODE_OBJECT_STORE_BYTES = 2 * GIB  # of 23 GiB; Ray's default (30 % of RAM per node) would reserve 14 GiB for two
ENGINE_RESOURCE = "bench_engine"
CONCURRENCY = (NODES, NODES)
BATCH_SIZE = 32
ENGINE_KWARGS = {"max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
PLACEMENT = {"bundles": [{"CPU": 1, ENGINE_RESOURCE: 1}]}
MAX_TOKENS = 1

LABELS = {"ours": "ours: rayllm batch (Prefect flow)", "peer": "peer: raw Ray Data LLM (read_json -> write_json)"}

PEER_SCRIPT = r'''
"""peer: raw Ray Data LLM on an existing cluster, read and written by the workers."""
import json, sys, time

MARKER = "BENCH_JSON "


def main():
    address, input_path, model, out_dir = sys.argv[1:5]
    settings = json.loads(sys.argv[5])
    marks = {"script_start": time.time()}
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(address=address)
    marks["ray_ready"] = time.time()
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=settings["engine_kwargs"],
        concurrency=tuple(settings["concurrency"]),
        batch_size=settings["batch_size"],
        placement_group_config=settings["placement_group_config"],
    )
    max_tokens = settings["max_tokens"]

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
    processor(ray.data.read_json(input_path)).write_json(out_dir)
    marks["written"] = time.time()
    ray.shutdown()
    marks["end"] = time.time()
    print(MARKER + json.dumps({"marks": marks}), flush=True)


if __name__ == "__main__":
    main()
'''


# --------------------------------------------------------------------------------------------
# The two-node cluster.
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TwoNodeCluster:
    """A head and one worker node on this machine, each a `ray start` with its own temp dir.

    Stopped by killing the processes of its own sessions (and their children: workers, vLLM
    engines), never with `ray stop`, which stops every Ray on the machine, other people's too.
    """

    def __init__(self, root: Path, node_cpus: int, object_store_bytes: int):
        self.root = root
        self.node_cpus = node_cpus
        self.object_store_bytes = object_store_bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dirs = [root / "head", root / "worker"]
        self.nodes: list[dict[str, Any]] = []
        self.start_s = 0.0

    def _common(self, temp_dir: Path) -> list[str]:
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.node_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--resources={json.dumps({ENGINE_RESOURCE: 1})}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # Ports of its own: two nodes on one host, and maybe another Ray of someone else's.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]

    def start(self) -> None:
        started = time.monotonic()
        head = [str(RAY), "start", "--head", f"--port={self.port}", f"--ray-client-server-port={_free_port()}"]
        head += ["--include-dashboard=false", *self._common(self.temp_dirs[0])]
        worker = [str(RAY), "start", f"--address={self.address}", *self._common(self.temp_dirs[1])]
        for cmd in (head, worker):
            done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        probe = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(json.dumps([dict(id=n['NodeID'][:12], alive=n['Alive'], head='node:__internal_head__' in n['Resources'], "
            "resources={k: v for k, v in n['Resources'].items() if not k.startswith('node:')}) for n in ray.nodes()]))"
        )
        done = subprocess.run([str(PYTHON), "-c", probe], capture_output=True, text=True, env=subprocess_env(), timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"cluster probe failed:\n{done.stderr[-2000:]}")
        self.nodes = [n for n in json.loads(done.stdout.strip().splitlines()[-1]) if n["alive"]]
        if len(self.nodes) != NODES:
            raise RuntimeError(f"expected {NODES} alive nodes, found {self.nodes}")
        self.start_s = time.monotonic() - started

    def processes(self) -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for temp_dir in self.temp_dirs:
            if not temp_dir.exists():
                continue
            for root in session_processes(str(temp_dir)):
                try:
                    for proc in [root, *root.children(recursive=True)]:
                        found[proc.pid] = proc
                except psutil.Error:
                    continue
        return found

    def stop(self) -> int:
        """Kill every process of both sessions; returns how many were alive."""
        victims = list(self.processes().values())
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=15)
        return len(victims)


# --------------------------------------------------------------------------------------------
# One driver run, sampled.
# --------------------------------------------------------------------------------------------


@dataclass
class Sampled:
    """A driver subprocess's run: its wall clock, output markers and the 0.5 s samples."""

    name: str
    log_path: str
    returncode: int | None = None
    timed_out: bool = False
    launched_at: float = 0.0
    wall_s: float = 0.0
    markers: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    # (s since launch, driver rss, driver cpu s, children rss, children cpu s, children alive)
    samples: list[tuple[float, int, float, int, float, int]] = field(default_factory=list)
    driver_cpu_s: float | None = None  # read from the exited (not yet reaped) process: exact
    children_cpu_s: float = 0.0  # each child's last sampled CPU seconds, summed
    children_seen: int = 0
    machine_cpu: dict[str, float] = field(default_factory=dict)
    load_avg_1m: list[float] = field(default_factory=list)


_ACTIVE: dict[int, subprocess.Popen[str]] = {}


def _kill_active() -> None:
    for proc in list(_ACTIVE.values()):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
    _ACTIVE.clear()


def _cpu_s(times: Any) -> float:
    return float(times.user + times.system)


def _machine_busy(before: Any, after: Any) -> dict[str, float]:
    """All CPU used on the machine between two psutil.cpu_times() (guest time is inside user)."""
    fields = [f for f in before._fields if f not in ("guest", "guest_nice")]
    total = sum(getattr(after, f) - getattr(before, f) for f in fields)
    idle = sum(getattr(after, f) - getattr(before, f) for f in ("idle", "iowait") if f in fields)
    return {"busy_cpu_s": round(total - idle, 2), "total_cpu_s": round(total, 2)}


def run_sampled(name: str, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> Sampled:
    """Run `cmd` in its own session, sampling it every SAMPLE_EVERY_S; its output goes to `log_path`.

    The exit is watched through a pidfd, which does not reap: the exited driver's own CPU seconds
    are read from /proc before it is reaped, so they are exact rather than 0.5 s old.
    """
    run = Sampled(name=name, log_path=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w", encoding="utf-8", errors="replace")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    machine_before = psutil.cpu_times()
    run.launched_at = time.time()
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
        bufsize=1,
    )
    _ACTIVE[proc.pid] = proc
    pidfd = os.pidfd_open(proc.pid)

    thread = follow_output(proc, log, started, run, tail_lines=80)
    driver = psutil.Process(proc.pid)
    child_cpu: dict[int, float] = {}
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    try:
        while True:
            now = time.monotonic() - started
            if now > timeout_s:
                run.timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                poller.poll()
                break
            try:
                with driver.oneshot():
                    rss, cpu = driver.memory_info().rss, _cpu_s(driver.cpu_times())
                children = driver.children(recursive=True)
            except psutil.Error:
                rss, cpu, children = 0, 0.0, []
            child_rss = 0
            for child in children:
                try:
                    with child.oneshot():
                        child_rss += child.memory_info().rss
                        child_cpu[child.pid] = _cpu_s(child.cpu_times())
                except psutil.Error:
                    continue
            if rss:
                run.samples.append(
                    (round(now, 2), rss, round(cpu, 2), child_rss, round(sum(child_cpu.values()), 2), len(children))
                )
            run.load_avg_1m.append(os.getloadavg()[0])
            if poller.poll(int(SAMPLE_EVERY_S * 1000)):  # readable the moment the driver exits: wall is exact
                break
        run.wall_s = time.monotonic() - started
        try:
            run.driver_cpu_s = round(_cpu_s(driver.cpu_times()), 2)  # the zombie still has its /proc/PID/stat
        except psutil.Error:
            run.driver_cpu_s = run.samples[-1][2] if run.samples else None
        run.machine_cpu = _machine_busy(machine_before, psutil.cpu_times())
        run.returncode = proc.wait()
    finally:
        os.close(pidfd)
        if proc.poll() is None:  # interrupted while it ran
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        _ACTIVE.pop(proc.pid, None)
        thread.join(timeout=10)
        run.children_cpu_s = round(sum(child_cpu.values()), 2)
        run.children_seen = len(child_cpu)
        # The Prefect temporary server lives in the driver's session: whatever of it is left goes now.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        log.write(f"# exit {run.returncode} after {run.wall_s:.2f} s (timed out: {run.timed_out})\n")
        log.close()
    return run


def driver_summary(run: Sampled) -> dict[str, Any]:
    """Peak and 10/50/90 % RSS of the driver, its CPU seconds and shares, and its children's."""
    if not run.samples:
        return {"samples": 0}

    def at(fraction: float) -> dict[str, float]:
        target = fraction * run.wall_s
        t, rss, cpu, *_ = min(run.samples, key=lambda s: abs(s[0] - target))
        return {"t_s": t, "rss_mib": round(rss / MIB, 1), "cpu_s": cpu}

    peak = max(run.samples, key=lambda s: s[1])
    busy = run.machine_cpu.get("busy_cpu_s") or 0.0
    driver_cpu = run.driver_cpu_s or 0.0
    p10, p90 = at(0.10), at(0.90)
    return {
        "samples": len(run.samples),
        "interval_s": SAMPLE_EVERY_S,
        "peak_rss_mib": round(peak[1] / MIB, 1),
        "peak_rss_gib": round(peak[1] / GIB, 3),
        "peak_at_s": peak[0],
        "under_1_gib": peak[1] < GIB,
        "rss_at_10pct": p10,
        "rss_at_50pct": at(0.50),
        "rss_at_90pct": p90,
        "rss_growth_10_to_90pct_mib": round(p90["rss_mib"] - p10["rss_mib"], 1),
        "cpu_s": driver_cpu,
        "cpu_per_wall": round(driver_cpu / run.wall_s, 4) if run.wall_s else None,
        "cpu_share_of_machine": round(driver_cpu / busy, 4) if busy else None,
        "children": {
            "what": "the driver's child processes (the Prefect temporary server for ours), summed",
            "seen": run.children_seen,
            "peak_rss_mib": round(max(s[3] for s in run.samples) / MIB, 1),
            "cpu_s": run.children_cpu_s,
            "cpu_share_of_machine": round(run.children_cpu_s / busy, 4) if busy else None,
        },
    }


def _load(run: Sampled) -> dict[str, float | None]:
    values = run.load_avg_1m
    return {"mean": round(sum(values) / len(values), 2) if values else None, "max": round(max(values), 2) if values else None}


def _count_lines(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def _base(run: Sampled, cmd: list[str], rows: int) -> dict[str, Any]:
    return {
        "command": " ".join(cmd),
        "expected_rows": rows,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "wall_s": round(run.wall_s, 3),
        "machine_cpu": run.machine_cpu,
        "machine_cpu_per_wall": round(run.machine_cpu["busy_cpu_s"] / run.wall_s, 3) if run.wall_s and run.machine_cpu else None,
        "load_avg_1m_during": _load(run),
        "driver": driver_summary(run),
        "log": run.log_path,
    }


def _finish(result: dict[str, Any], run: Sampled, rows_ok: int | None, accounted: bool, error: str | None) -> dict[str, Any]:
    result["rows_ok"] = rows_ok
    result["all_rows_accounted"] = accounted
    result["ok"] = run.returncode == 0 and accounted and error is None
    result["error"] = error
    result["rows_per_s"] = round(rows_ok / run.wall_s, 2) if rows_ok and run.wall_s else None
    if not result["ok"]:
        result["tail"] = run.tail[-30:]
    return result


# --------------------------------------------------------------------------------------------
# The two systems.
# --------------------------------------------------------------------------------------------


def write_config(path: Path, input_path: Path, output: Path, model: Path) -> None:
    import yaml

    config = {
        "input": str(input_path),
        "output": str(output),
        "model": {
            "source": str(model),
            "id": "tiny",
            "engine": "vllm",
            "engine_kwargs": dict(ENGINE_KWARGS),
            "concurrency": list(CONCURRENCY),
            "batch_size": BATCH_SIZE,
            "placement_group_config": PLACEMENT,
        },
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS},
        "max_error_rate": 0.05,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def run_ours(
    work: Path, requests: Path, model: Path, rows: int, address: str, logs: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    output = work / f"out-ours-{tag}"
    config = work / f"ours-{tag}.yaml"
    write_config(config, requests, output, model)
    cmd = [str(RAYLLM), "batch", str(config), "--ray-address", address, "--no-progress", "--overwrite"]
    run = run_sampled(f"ours-{tag}", cmd, subprocess_env(), logs / f"scale-ours-{tag}.log", timeout_s)
    result = _base(run, cmd, rows)
    manifest_path = output / "manifest.json"
    if not manifest_path.exists():
        return _finish(result, run, None, False, f"rayllm batch exited {run.returncode}; no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    counts = manifest.get("counts", {})
    results_files = sorted(output.glob("results*.jsonl"))
    errors_files = sorted(output.glob("errors*.jsonl"))
    result_lines, error_lines = _count_lines(results_files), _count_lines(errors_files)
    completed, failed = counts.get("completed"), counts.get("failed")
    accounted = completed is not None and failed is not None and completed + failed == rows and result_lines + error_lines == rows
    result.update(
        manifest_status=manifest.get("status"),
        manifest_counts=counts,
        manifest_timings=manifest.get("timings"),
        manifest_throughput=manifest.get("throughput"),
        manifest_attempts=manifest.get("attempts"),
        results_files=[p.name for p in results_files],
        results_lines=result_lines,
        errors_lines=error_lines,
        rows_failed=failed,
    )
    error = (
        None
        if accounted
        else f"rows not accounted for: manifest {completed}+{failed}, lines {result_lines}+{error_lines}, expected {rows}"
    )
    return _finish(result, run, completed, accounted, error)


def run_peer(
    work: Path, requests: Path, model: Path, rows: int, address: str, logs: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    script = work / "peer_scale.py"
    script.write_text(PEER_SCRIPT)
    out = work / f"out-peer-{tag}"
    settings = {
        "engine_kwargs": ENGINE_KWARGS,
        "concurrency": CONCURRENCY,
        "batch_size": BATCH_SIZE,
        "placement_group_config": PLACEMENT,
        "max_tokens": MAX_TOKENS,
    }
    cmd = [str(PYTHON), str(script), address, str(requests), str(model), str(out), json.dumps(settings)]
    run = run_sampled(f"peer-{tag}", cmd, subprocess_env(), logs / f"scale-peer-{tag}.log", timeout_s)
    result = _base(run, cmd, rows)
    parts = sorted(out.glob("*.json")) if out.exists() else []
    lines = _count_lines(parts)
    marks = run.markers[-1]["marks"] if run.markers else {}
    result.update(
        output_files=len(parts),
        output_lines=lines,
        marks_rel_launch_s={k: round(v - run.launched_at, 3) for k, v in marks.items()},
    )
    error = None if run.returncode == 0 else f"peer script exited {run.returncode}"
    return _finish(result, run, lines, lines == rows, error)


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

DEFINITIONS = [
    "wall = driver subprocess launch -> exit, timed by the harness (imports, for ours the Prefect temporary server, "
    "connecting to the running cluster, engine start, inference, writing, shutdown); the cluster is started before.",
    "rows/s = rows completed / wall.",
    "driver = the subprocess itself (the `rayllm` CLI process, or the peer's script), not its children, not Ray "
    "workers or vLLM engines; RSS and CPU seconds (user + system) sampled every 0.5 s; its final CPU seconds are read "
    "as it exits.",
    "driver CPU / wall = the driver's CPU seconds / wall seconds (1.0 = one core busy the whole run).",
    "driver share of machine CPU = the driver's CPU seconds / all CPU seconds used on the machine during the run "
    "(psutil.cpu_times before and after; anything else running on the machine counts in the denominator).",
    "children = the driver's child processes (for ours: the Prefect temporary server), reported apart.",
]


def ratios(results: dict[str, dict[str, Any]], rows: int, peer_rows: int) -> dict[str, Any]:
    ours, peer = results.get("ours", {}), results.get("peer", {})
    if not (ours.get("ok") and peer.get("ok")):
        return {}
    od, pd = ours["driver"], peer["driver"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "rows_per_s_ours_over_peer": ratio(ours["rows_per_s"], peer["rows_per_s"]),
        "same_input": rows == peer_rows,
        "note": None
        if rows == peer_rows
        else f"ours ran {rows} rows, the peer {peer_rows}: only the rows/s ratio compares like with like",
        "wall_ours_over_peer": ratio(ours["wall_s"], peer["wall_s"]) if rows == peer_rows else None,
        "driver_peak_rss_ours_over_peer": ratio(od.get("peak_rss_mib"), pd.get("peak_rss_mib")),
        "driver_cpu_per_wall_ours_over_peer": ratio(od.get("cpu_per_wall"), pd.get("cpu_per_wall")),
        "driver_cpu_share_ours_over_peer": ratio(od.get("cpu_share_of_machine"), pd.get("cpu_share_of_machine")),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(results: dict[str, dict[str, Any]], ratio: dict[str, Any]) -> str:
    header = [
        "system",
        "rows ok/expected",
        "wall s",
        "rows/s",
        "driver peak RSS MiB",
        "RSS at 10/50/90 % MiB",
        "driver CPU s",
        "driver CPU / wall",
        "driver share of machine CPU",
        "children peak RSS MiB / CPU s",
        "machine CPU / wall",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, r in results.items():
        if not r.get("wall_s") and not r.get("ok"):
            lines.append(f"| {LABELS[key]} | FAILED: {r.get('error')} |" + " - |" * (len(header) - 2))
            continue
        d = r.get("driver", {})
        c = d.get("children", {})
        share = d.get("cpu_share_of_machine")
        row = [
            LABELS[key] + ("" if r.get("ok") else f" (FAILED: {r.get('error')})"),
            f"{_fmt(r.get('rows_ok'))}/{r.get('expected_rows')}",
            _fmt(r.get("wall_s"), 1),
            _fmt(r.get("rows_per_s")),
            _fmt(d.get("peak_rss_mib"), 0),
            "/".join(_fmt(d.get(f"rss_at_{p}pct", {}).get("rss_mib"), 0) for p in (10, 50, 90)),
            _fmt(d.get("cpu_s"), 1),
            _fmt(d.get("cpu_per_wall"), 3),
            f"{share * 100:.1f} %" if share is not None else "-",
            f"{_fmt(c.get('peak_rss_mib'), 0)} / {_fmt(c.get('cpu_s'), 1)}",
            _fmt(r.get("machine_cpu_per_wall"), 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines)
    if ratio:
        text += "\n\n| ratio (ours / peer) | value |\n|---|---|\n"
        text += "\n".join(f"| {name} | {_fmt(value, 3)} |" for name, value in ratio.items() if name not in ("same_input", "note"))
        if ratio.get("note"):
            text += f"\n\n{ratio['note']}"
    return text


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="requests (max_tokens 1) through ours")
    parser.add_argument(
        "--peer-rows", type=int, default=None, help="requests through the peer (default --rows; the first N of the same input)"
    )
    parser.add_argument("--systems", default="ours,peer", help="which of ours,peer to run, in order")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the unmeasured 64-row run of each system (fills vLLM's compile cache)"
    )
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per measured system")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where scale-<time>.json/.md and the logs go")
    parser.add_argument("--keep-work", action="store_true", help="keep the temp work dir (inputs, outputs, Ray temp dirs)")
    args = parser.parse_args()
    peer_rows = args.peer_rows if args.peer_rows is not None else args.rows
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(LABELS) or not systems:
        parser.error(f"--systems: a comma-separated list of {sorted(LABELS)}")

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    logs = results_dir / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = TwoNodeCluster(work / "ray", NODE_CPUS, NODE_OBJECT_STORE_BYTES)
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "load_avg_at_start": os.getloadavg(),
        },
        "settings": {
            "rows": args.rows,
            "peer_rows": peer_rows,
            "systems": systems,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "engine_kwargs": ENGINE_KWARGS,
            "concurrency": CONCURRENCY,
            "batch_size": BATCH_SIZE,
            "placement_group_config": PLACEMENT,
            "nodes": NODES,
            "node_cpus": NODE_CPUS,
            "node_object_store_bytes": NODE_OBJECT_STORE_BYTES,
            "warmup": not args.no_warmup,
        },
        "definitions": DEFINITIONS,
        "code_at_start": code_version(),
    }
    results: dict[str, dict[str, Any]] = {}
    exit_code = 0
    try:
        print(f"work dir: {work}", flush=True)
        model = RESULTS / "model"
        build_model(model)
        t = time.monotonic()
        requests = work / "requests.jsonl"
        write_requests(requests, args.rows, MAX_TOKENS, seed=3)
        inputs = {"ours": (requests, args.rows)}
        if peer_rows == args.rows:
            inputs["peer"] = (requests, args.rows)
        else:
            peer_requests = work / "peer-requests.jsonl"
            write_requests(peer_requests, peer_rows, MAX_TOKENS, seed=3)  # same seed: the first rows of the same input
            inputs["peer"] = (peer_requests, peer_rows)
        report["input"] = {
            "path": str(requests),
            "bytes": requests.stat().st_size,
            "written_in_s": round(time.monotonic() - t, 1),
        }
        print(
            f"input: {args.rows} requests, {requests.stat().st_size / MIB:.1f} MiB, in {time.monotonic() - t:.1f} s", flush=True
        )
        cluster.start()
        report["cluster"] = {"address": cluster.address, "nodes": cluster.nodes, "start_s": round(cluster.start_s, 1)}
        print(f"cluster: {cluster.address}, {len(cluster.nodes)} nodes, started in {cluster.start_s:.1f} s", flush=True)
        runners = {"ours": run_ours, "peer": run_peer}
        if not args.no_warmup:
            warm = work / "warmup.jsonl"
            write_requests(warm, 64, MAX_TOKENS, seed=4)
            report["warmup"] = {}
            for name in systems:
                r = runners[name](work, warm, model, 64, cluster.address, logs, f"{stamp}-warmup", args.timeout)
                report["warmup"][name] = {"ok": r["ok"], "wall_s": r["wall_s"], "error": r["error"]}
                print(f"warm-up (not measured) {name}: {'ok' if r['ok'] else 'FAILED'} in {r['wall_s']:.1f} s", flush=True)
        for name in systems:
            path, rows = inputs[name]
            print(f"measuring {LABELS[name]} on {rows} rows ...", flush=True)
            r = runners[name](work, path, model, rows, cluster.address, logs, stamp, args.timeout)
            results[name] = r
            d = r["driver"]
            print(
                f"  {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])}: wall {r['wall_s']:.1f} s, {r['rows_ok']} rows, "
                f"{_fmt(r['rows_per_s'])} rows/s; driver peak RSS {d.get('peak_rss_mib')} MiB, CPU {d.get('cpu_s')} s "
                f"({_fmt(d.get('cpu_per_wall'), 3)} of wall, {_fmt(d.get('cpu_share_of_machine'), 3)} of the machine's CPU)",
                flush=True,
            )
            if not r["ok"]:
                exit_code = 1
                print("  " + "\n  ".join(r.get("tail", [])[-15:]), flush=True)
    except KeyboardInterrupt:
        exit_code = 130
        report["interrupted"] = True
        print("interrupted", flush=True)
    except Exception as exc:  # the report and the cleanup still happen
        exit_code = 1
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {report['error']}", flush=True)
    finally:
        _kill_active()
        report["cluster_processes_killed"] = cluster.stop()
        report["results"] = results
        report["ratios"] = ratios(results, args.rows, peer_rows)
        report["table_md"] = markdown_table(results, report["ratios"])
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["code_at_end"] = code_version()
        report["machine"]["load_avg_at_end"] = os.getloadavg()
        out = results_dir / f"scale-{stamp}{'-interrupted' if report.get('interrupted') else ''}.json"
        out.write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(render_markdown(report))
        print("\nDefinitions:\n- " + "\n- ".join(DEFINITIONS) + "\n\n" + report["table_md"] + "\n", flush=True)
        print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)
        if args.keep_work:
            print(f"kept work dir {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return exit_code


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    return "\n".join(
        [
            f"# Scale benchmark ({report['started_at']})",
            "",
            f"{s['rows']} OpenAI Batch requests through ours, {s['peer_rows']} through the peer, max_tokens 1, tiny untrained "
            f"Llama (bench/results/model), vLLM CPU {s['engine_kwargs']}, concurrency {s['concurrency']} (one engine per node), "
            f"batch_size {s['batch_size']}, on a local {s['nodes']}-node Ray cluster ({s['node_cpus']} logical CPUs per node). "
            f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['ram_gib']} GiB; load average at start "
            f"{tuple(round(x, 2) for x in report['machine']['load_avg_at_start'])}. Code: {report.get('code_at_start')}.",
            "",
            "Definitions:",
            *[f"- {d}" for d in report["definitions"]],
            "",
            report["table_md"],
            "",
        ]
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        _kill_active()
