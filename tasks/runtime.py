"""Connecting the flow process to Ray, once per process."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rayllm_stages import ray_runtime


@task(name="connect-ray", cache_policy=NO_CACHE)
def connect_ray(address: str | None = None) -> dict[str, object]:
    """Connect this flow process to Ray: reuse a live connection, else start local Ray or join a cluster.

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
    get_run_logger().info(
        "Ray %s at %s (%s GPUs)", "started" if connection.started_here else "connected", connection.address, connection.gpus
    )
    return {"address": connection.address, "started_here": connection.started_here, "gpus": connection.gpus}
