"""Connecting the flow process to Ray, once per process, and where Ray workers' output is logged."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.logging.loggers import flow_run_logger

from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
from prefect_rayllm.rayllm_stages.runtime import worker_logs as ray_logs

F = TypeVar("F", bound=Callable[..., Any])


def ray_worker_env(api_url: str | None = None) -> dict[str, str]:
    """The environment this process gives its Ray jobs' workers (the job's runtime_env).

    Prefect code must never start a temporary server of its own inside a Ray worker (workers of
    a cluster do not reach this process's temporary server, and each start takes seconds): Prefect
    there is refused that, and is pointed at this process's Prefect API instead. Nothing of this
    package calls Prefect on a worker; this keeps it so for whatever a user's code does there.

    Args:
        api_url: The Prefect API to point workers at; default PREFECT_API_URL, else the temporary
            server this process started (when it has one).
    """
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}
    url = api_url or PREFECT_API_URL.value() or _temporary_server_url()
    if url:
        env["PREFECT_API_URL"] = url
    return env


def temporary_prefect_server() -> Any:
    """The temporary Prefect server this process's flows will use (Prefect's own
    `SubprocessASGIServer`, as Prefect starts it without PREFECT_API_URL), its port chosen now so
    that its URL is known before it answers; call `.start()` on it (it may run in a thread).

    Its process inherits this process's supervision mark: it ends with the command that started
    it, even a killed one (`rayllm_stages.runtime.supervision`).
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.port is None:
        server.port = server.find_available_port()
    return server


def _temporary_server_url() -> str | None:
    """The URL of the temporary server Prefect uses in this process, once its port is chosen.

    `SubprocessASGIServer()` is that server (one per process: Prefect's own client and event
    workers get it the same way); made before Prefect starts it, it is the one Prefect will start.
    """
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
    except Exception:  # not Prefect's server API: the URL is a courtesy, the refusal above is the guarantee
        return None
    return server.api_url if server.port is not None else None


@task(name="connect-ray", cache_policy=NO_CACHE)
def connect_ray(address: str | None = None, block: str | None = None) -> dict[str, object]:
    """Connect this flow process to Ray: reuse a live connection, else start local Ray or join a cluster.

    From then on, the output of Ray's workers (actors, tasks, vLLM engines) goes to this flow run's
    log at the level in `RAYLLM_RAY_LOG_LEVEL` (default WARNING; OFF: none), repeats dropped and
    capped per minute (`RAYLLM_RAY_LOG_MAX_LINES_PER_MINUTE`, default 120); while a task decorated
    with `worker_logs_to_task` runs (the tasks that run engines), to that task's log.

    Args:
        address: None for a local Ray in this process; "auto" or "ray://head:10001" for a cluster.
        block: Instead of `address`, the name of a Ray connection block (`tasks.blocks.RayConnection`:
            address, namespace, runtime_env).

    Returns:
        The address, whether this call started Ray, and the cluster's GPU count.

    Example:
        ```python
        @flow
        def my_flow():
            connect_ray("auto")
        ```
    """
    if block:
        from prefect_rayllm.tasks.blocks import connect_ray_block

        connection = connect_ray_block(block, env_vars=ray_worker_env())
    else:
        connection = ray_runtime.connect(address, env_vars=ray_worker_env())
    context = FlowRunContext.get()
    # The flow run's logger, not this task's: get_run_logger() inside a task is the task's.
    target = flow_run_logger(context.flow_run, context.flow) if context and context.flow_run else get_run_logger()
    ray_logs.forward_worker_logs(target)
    get_run_logger().info(
        "Ray %s at %s (%s GPUs)", "started" if connection.started_here else "connected", connection.address, connection.gpus
    )
    return {"address": connection.address, "started_here": connection.started_here, "gpus": connection.gpus}


def worker_logs_to_task(fn: F) -> F:
    """Decorate a task's function (under `@task`) whose Ray work runs an engine: the workers'
    forwarded output lands in that task's log while it runs, not in the flow's or `connect-ray`'s.

    Example:
        ```python
        @task(name="run-batch")
        @worker_logs_to_task
        def run_batch(config: BatchJobConfig) -> Execution: ...
        ```
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
        except Exception:  # called outside a run: leave the forwarding as it is
            return fn(*args, **kwargs)
        with ray_logs.forwarding_to(logger):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
