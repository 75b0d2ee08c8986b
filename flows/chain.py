"""Multi-model chains as a Prefect flow: one model reformats, another answers, a third may score."""

from __future__ import annotations

from prefect import flow

from prefect_rayllm.flows.jobs import run_job
from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.chain import chain_job
from prefect_rayllm.tasks.jobs import FLOW_RESULT, run_cached_job
from prefect_rayllm.tasks.reporting import job_failed_hook, publish_chain_report


@flow(name="run-chain", validate_parameters=True, on_failure=[job_failed_hook("chain")], **FLOW_RESULT)
def run_chain(config: ChainJobConfig, overwrite: bool = False) -> Manifest:
    """Run a text-curation chain (e.g. reformat -> answer -> score) with all steps overlapping.

    Args:
        config: The table, the ordered steps (model, prompt, sampling, output column, parse) and limits.
        overwrite: Start over when the output holds a run with other settings.

    Returns:
        The manifest, with per-step rows, errors and tokens. The run fails (after writing) when the
        error rate passes `config.max_error_rate`. It is the run's persisted result; a rerun of a
        completed chain is a Cached `chain-job` task (same manifest, no engine started).
    """
    return run_job(
        "chain",
        config,
        overwrite,
        execute=lambda config, overwrite: run_cached_job(chain_job, ChainJob, config, overwrite),
        publish=publish_chain_report,
    )
