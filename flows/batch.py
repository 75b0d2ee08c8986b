"""Batch inference as a Prefect flow: OpenAI Batch files or tables through Ray Data LLM + vLLM."""

from __future__ import annotations

from prefect import flow

from prefect_rayllm.flows.jobs import run_job
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.batch import finalize_batch, prepare_batch, run_batch
from prefect_rayllm.tasks.reporting import ErrorRateExceeded, job_failed_hook, publish_batch_report

__all__ = ["ErrorRateExceeded", "batch_inference"]


@flow(name="batch-inference", validate_parameters=True, on_failure=[job_failed_hook("batch")])
def batch_inference(config: BatchJobConfig, overwrite: bool = False) -> Manifest:
    """Run a batch job: check, resume or start, infer, write results, errors and the manifest.

    Args:
        config: The job (input, output, model, sampling, prompt, limits).
        overwrite: Start over when the output holds a run with other settings.

    Returns:
        The manifest. The run fails (after writing everything) if the error rate passes
        `config.max_error_rate`.
    """
    return run_job(
        "batch",
        config,
        overwrite,
        prepare=prepare_batch,
        run=run_batch,
        finalize=finalize_batch,
        publish=publish_batch_report,
    )
