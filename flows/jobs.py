"""The shape every job flow shares (batch, chain, curation): the job (connect Ray, prepare, run,
finalize; batch and chain as one cached task), report, conclude. A failure becomes its event
through the flow's `job_failed_hook`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger

from prefect_rayllm.rayllm_stages.config.base import RowJobConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.reporting import conclude_job


def run_job(kind: str, config: Any, overwrite: bool, *, execute: Callable[[Any, bool], Manifest], publish: Callable) -> Manifest:
    """Run the job (`execute(config, overwrite)`: the lifecycle of `jobs.lifecycle`, in tasks), then
    conclude: emit `rayllm.<kind>.completed`, or fail the run when a row job's error rate is above its limit.

    `publish(manifest)` makes the job's artifacts. Both run on every flow run, a cached job's too,
    so the error limit is the one in this run's config. The flow declares
    `on_failure=[job_failed_hook(kind)]` so that any failure, the error rate's included, emits `rayllm.<kind>.failed`.
    """
    manifest = execute(config, overwrite)
    publish(manifest)
    conclude_job(kind, config.output, manifest, config.max_error_rate if isinstance(config, RowJobConfig) else None)
    get_run_logger().info("outputs: %s", ", ".join(f"{name} {url}" for name, url in manifest.outputs.items()))
    return manifest
