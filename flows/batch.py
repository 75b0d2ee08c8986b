"""Batch inference as a Prefect flow: OpenAI Batch files or tables through Ray Data LLM + vLLM."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from rayllm_stages.config import BatchJobConfig
from rayllm_stages.manifest import Manifest
from tasks.batch import finalize_batch, prepare_batch, run_batch
from tasks.reporting import ErrorRateExceeded, conclude_job, emit_job_event, publish_batch_report
from tasks.runtime import connect_ray

__all__ = ["ErrorRateExceeded", "batch_inference"]


@flow(name="batch-inference", validate_parameters=True)
def batch_inference(config: BatchJobConfig, overwrite: bool = False) -> Manifest:
    """Run a batch job: check, resume or start, infer, write results, errors and the manifest.

    Args:
        config: The job (input, output, model, sampling, prompt, limits).
        overwrite: Start over when the output holds a run with other settings.

    Returns:
        The manifest. The run fails (after writing everything) if the error rate passes
        `config.max_error_rate`.
    """
    run = FlowRunContext.get()
    flow_run_id = str(run.flow_run.id) if run and run.flow_run else None
    try:
        connect_ray(config.ray_address)
        preparation = prepare_batch(config, overwrite)
        execution = None if preparation.already_complete else run_batch(config)
        manifest = finalize_batch(config, execution, flow_run_id)
        publish_batch_report(manifest)
    except Exception as exc:
        emit_job_event("batch", "failed", config.output, {"reason": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    conclude_job("batch", config.output, manifest, config.max_error_rate)
    get_run_logger().info("results: %s", manifest.outputs["results"])
    return manifest
