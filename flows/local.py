"""Run a job flow in this process, as `rayllm <job>` and `rayllm demo` do: Prefect's server and Ray
start side by side, the flow runs with a progress bar on stderr, and its return value comes back.

Nothing here parses arguments or prints results: that is the CLI's job (`prefect_rayllm.flows.cli`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def quiet_ray_logs() -> None:
    """Ray actors and vLLM print a lot to the driver; the progress bar says what matters."""
    os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if os.environ["RAYLLM_RAY_LOGS"] == "0":
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_runtimes(ray_address: str | None) -> None:
    """Start Prefect's ephemeral server (when no PREFECT_API_URL is set) while Ray starts.

    Both take seconds; the flow would otherwise start them one after the other.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    from prefect_rayllm.flows.console import apply_console_settings
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
    from prefect_rayllm.tasks.runtime import ray_worker_env, temporary_prefect_server

    background = [threading.Thread(target=_import_engine_stack, name="import-engine-stack", daemon=True)]
    if not PREFECT_API_URL.value() and PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        server = temporary_prefect_server()  # its URL is known now; Ray's workers are told it
        background.append(threading.Thread(target=server.start, name="prefect-server-start", daemon=True))
    for thread in background:
        thread.start()
    ray_runtime.connect(ray_address, env_vars=ray_worker_env())
    apply_console_settings()
    for thread in background:
        thread.join()


def _import_engine_stack() -> None:
    """Import Ray's vLLM stage (torch, transformers, vLLM: seconds) while Ray starts; the
    processor build would import it anyway. Without vLLM installed (HTTP-only) it is skipped."""
    from prefect_rayllm.rayllm_stages.compat import ray_private

    try:
        ray_private.vllm_engine_stage()
    except ImportError:
        pass


def run_with_progress(
    flow_fn: Callable[..., Any], label: str, config: Any, overwrite: bool, console: Console, show_progress: bool = True
) -> Any:
    """Start the runtimes, then run a job flow (`flow_fn(config=..., overwrite=...)`) in this process
    with a progress bar on `console`; returns what the flow returns (its manifest or result)."""
    from prefect_rayllm.tasks.progress import progress_listener

    start_runtimes(config.ray_address)
    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        task_id = bar.add_task("rows", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        with progress_listener(update):
            return flow_fn(config=config, overwrite=overwrite)
