"""The shape every job flow shares: connect Ray, prepare, run, finalize, report, conclude."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext

from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.reporting import conclude_job, emit_job_event
from prefect_rayllm.tasks.runtime import connect_ray


def run_job(
    kind: str, config: Any, overwrite: bool, *, prepare: Callable, run: Callable, finalize: Callable, publish: Callable
) -> Manifest:
    """Run one job's tasks in order; emit `rayllm.<kind>.failed` on any error, else conclude."""
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    try:
        connect_ray(config.ray_address)
        preparation = prepare(config, overwrite)
        execution = None if preparation.already_complete else run(config)
        manifest = finalize(config, execution, flow_run_id)
        publish(manifest)
    except Exception as exc:
        emit_job_event(kind, "failed", config.output, {"reason": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    conclude_job(kind, config.output, manifest, config.max_error_rate)
    get_run_logger().info("results: %s", manifest.outputs["results"])
    return manifest
