"""One Ray per process: connect once, reuse it, and never leave an orphaned local cluster behind.

A local Ray started here is recorded under `~/.cache/rayllm/local-ray/`. If the process that
started it dies without shutting it down (SIGKILL, OOM), the next start reaps it: its GCS, raylet,
workers and vLLM engine processes would otherwise hold CPU and memory for good.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from prefect_rayllm.rayllm_stages.compat import ray_private
from prefect_rayllm.rayllm_stages.runtime import worker_logs

logger = logging.getLogger(__name__)

REGISTRY = Path(os.environ.get("RAYLLM_CACHE_DIR", Path.home() / ".cache" / "rayllm")) / "local-ray"
# Logical CPUs for a local Ray. Every stage actor, the engine bundle and the read/write tasks each
# hold at least one; fewer than ~8 deadlocks a vLLM pipeline on a 2-core machine.
MIN_LOCAL_CPUS = 8


@dataclass
class RayConnection:
    address: str
    started_here: bool
    gpus: float


def connect(address: str | None = None, *, env_vars: dict[str, str] | None = None, num_cpus: int | None = None) -> RayConnection:
    """Connect this process to Ray once: reuse a live connection, else start or join one.

    Args:
        address: None for a local Ray in this process; "auto" or "ray://host:10001" for a cluster.
        env_vars: Environment for Ray workers (e.g. PREFECT_API_URL), set only when connecting.
        num_cpus: Logical CPUs of a local Ray (default: max(8, os.cpu_count())).
    """
    import ray

    if ray.is_initialized():
        return _describe(started_here=False)
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars)} if env_vars else {}
    # RAYLLM_RAY_LOGS=0 keeps Ray worker and vLLM output off this process's console.
    log_to_driver = os.environ.get("RAYLLM_RAY_LOGS", "1") != "0"
    if address:
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=log_to_driver)
        worker_logs.keep_root_logging()
        return _describe(started_here=False)
    reap_orphaned_local_clusters()
    # Ray 2.60 turns token auth on for a new local cluster; the one started here serves this
    # process alone (no dashboard), so it runs without unless RAY_AUTH_MODE says otherwise.
    # A cluster joined above keeps whatever auth it has: its token, if any, is Ray's to find.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
        include_dashboard=False,
        runtime_env=runtime_env or None,
        log_to_driver=log_to_driver,
    )
    _register_local_cluster()
    worker_logs.keep_root_logging()
    return _describe(started_here=True)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _registry_file(os.getpid()).unlink(missing_ok=True)


def _describe(started_here: bool) -> RayConnection:
    import ray

    context = ray.get_runtime_context()
    address = getattr(context, "gcs_address", None) or "local"
    return RayConnection(address=address, started_here=started_here, gpus=ray.cluster_resources().get("GPU", 0.0))


def _session_dir() -> str | None:
    return ray_private.ray_session_dir()


def _registry_file(pid: int) -> Path:
    return REGISTRY / f"{pid}.json"


def _register_local_cluster() -> None:
    session = _session_dir()
    if not session:
        return
    REGISTRY.mkdir(parents=True, exist_ok=True)
    started = psutil.Process().create_time()
    _registry_file(os.getpid()).write_text(json.dumps({"pid": os.getpid(), "created": started, "session_dir": session}))
    atexit.register(_registry_file(os.getpid()).unlink, missing_ok=True)


def reap_orphaned_local_clusters() -> int:
    """Kill local Ray clusters whose starting process is gone; returns how many processes died."""
    killed = 0
    for record_file in REGISTRY.glob("*.json") if REGISTRY.exists() else []:
        try:
            record = json.loads(record_file.read_text())
        except (OSError, json.JSONDecodeError):
            record_file.unlink(missing_ok=True)
            continue
        if _alive(record["pid"], record["created"]):
            continue
        killed += _kill_session(record["session_dir"])
        record_file.unlink(missing_ok=True)
    if killed:
        logger.warning("reaped %d processes of local Ray clusters left by dead drivers", killed)
    return killed


def _alive(pid: int, created: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - created) < 1.0
    except psutil.Error:
        return False


def session_processes(session_dir: str) -> list[psutil.Process]:
    """The processes of one Ray session: those whose command line names its folder (GCS, raylet,
    monitors) and those holding files open in it (agents and workers, whose titles Ray rewrites, and
    which outlive a raylet that died before them)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if any(session_dir in part for part in proc.info["cmdline"] or []) or _holds_file_in(proc, session_dir):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _holds_file_in(proc: psutil.Process, folder: str) -> bool:
    try:
        return any(f.path.startswith(folder) for f in proc.open_files())
    except psutil.Error:
        return False


def _kill_session(session_dir: str) -> int:
    """Kill every process started for one Ray session, children (workers, vLLM engines) included."""
    victims: dict[int, psutil.Process] = {}
    for root in session_processes(session_dir):
        try:
            for proc in [root, *root.children(recursive=True)]:
                victims[proc.pid] = proc
        except psutil.Error:
            continue
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    return len(victims)
