"""Batch inference as a Prefect flow: OpenAI Batch files or tables through Ray Data LLM + vLLM."""

from __future__ import annotations

from prefect import flow

from prefect_rayllm.flows.jobs import run_job
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.batch import batch_job
from prefect_rayllm.tasks.jobs import FLOW_RESULT, run_cached_job
from prefect_rayllm.tasks.reporting import ErrorRateExceeded, job_failed_hook, publish_batch_report

__all__ = ["ErrorRateExceeded", "batch_inference"]


@flow(name="batch-inference", validate_parameters=True, on_failure=[job_failed_hook("batch")], **FLOW_RESULT)
def batch_inference(config: BatchJobConfig, overwrite: bool = False) -> Manifest:
    """Run a batch job: check, resume or start, infer, write results, errors and the manifest.

    Args:
        config: The job (input, output, model, sampling, prompt, limits).
        overwrite: Start over when the output holds a run with other settings.

    Returns:
        The manifest, also the run's persisted result (`run_deployment(...).state.result()`). The
        run fails (after writing everything) if the error rate passes `config.max_error_rate`. A
        rerun of a completed job is a Cached `batch-job` task: same manifest, no engine started.
    """
    return run_job(
        "batch",
        config,
        overwrite,
        execute=lambda config, overwrite: run_cached_job(batch_job, BatchJob, config, overwrite),
        publish=publish_batch_report,
    )
