"""The shape every job flow shares (batch, chain, curation): connect Ray, prepare, run, finalize,
report, conclude. A failure becomes its event through the flow's `job_failed_hook`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext

from prefect_rayllm.rayllm_stages.config.base import RowJobConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.reporting import conclude_job
from prefect_rayllm.tasks.runtime import connect_ray


def run_job(
    kind: str, config: Any, overwrite: bool, *, prepare: Callable, run: Callable, finalize: Callable, publish: Callable
) -> Manifest:
    """Run one job's tasks in order (the lifecycle of `jobs.lifecycle`), then conclude: emit
    `rayllm.<kind>.completed`, or fail the run when a row job's error rate is above its limit.

    `publish(manifest)` makes the job's artifacts. The flow declares `on_failure=[job_failed_hook(kind)]`
    so that any failure, the error rate's included, emits `rayllm.<kind>.failed`.
    """
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    connect_ray(config.ray_address)
    preparation = prepare(config, overwrite)
    execution = None if preparation.already_complete else run(config)
    manifest = finalize(config, execution, flow_run_id)
    publish(manifest)
    conclude_job(kind, config.output, manifest, config.max_error_rate if isinstance(config, RowJobConfig) else None)
    get_run_logger().info("outputs: %s", ", ".join(f"{name} {url}" for name, url in manifest.outputs.items()))
    return manifest
