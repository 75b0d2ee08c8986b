"""Connecting the flow process to Ray, once per process."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
from prefect_rayllm.rayllm_stages.runtime import worker_logs as ray_logs


@task(name="connect-ray", cache_policy=NO_CACHE)
def connect_ray(address: str | None = None) -> dict[str, object]:
    """Connect this flow process to Ray: reuse a live connection, else start local Ray or join a cluster.

    From then on, the output of Ray's workers (actors, tasks, vLLM engines) goes to this flow run's
    log at the level in `RAYLLM_RAY_LOG_LEVEL` (default WARNING; OFF: none), repeats dropped and
    capped per minute (`RAYLLM_RAY_LOG_MAX_LINES_PER_MINUTE`, default 120).

    Args:
        address: None for a local Ray in this process; "auto" or "ray://head:10001" for a cluster.

    Returns:
        The address, whether this call started Ray, and the cluster's GPU count.

    Example:
        ```python
        @flow
        def my_flow():
            connect_ray("auto")
        ```
    """
    connection = ray_runtime.connect(address)
    flow_run = FlowRunContext.get()
    ray_logs.forward_worker_logs(get_run_logger(flow_run) if flow_run else get_run_logger())
    get_run_logger().info(
        "Ray %s at %s (%s GPUs)", "started" if connection.started_here else "connected", connection.address, connection.gpus
    )
    return {"address": connection.address, "started_here": connection.started_here, "gpus": connection.gpus}
