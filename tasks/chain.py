"""Chain tasks: prepare, run, finalize a multi-model chain. Each is safe to retry; a retry resumes."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Execution, Preparation
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.batch import EXECUTION_RETRIES, STORAGE_RETRIES
from prefect_rayllm.tasks.jobs import JOB_RESULT, JobCache, run_lifecycle
from prefect_rayllm.tasks.progress import ProgressReporter
from prefect_rayllm.tasks.reporting import artifact_key
from prefect_rayllm.tasks.runtime import worker_logs_to_task
from prefect_rayllm.tasks.secrets import resolve_api_key


@task(name="prepare-chain", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def prepare_chain(config: ChainJobConfig, overwrite: bool = False) -> Preparation:
    """Check the table and every step's template against the columns it may read; start or resume."""
    preparation = ChainJob(config).prepare(overwrite=overwrite)
    get_run_logger().info(
        "chain %s: %d rows, %d already done, steps: %s",
        config.output,
        preparation.total_rows,
        preparation.done_rows,
        " -> ".join(s.name for s in config.steps),
    )
    return preparation


@task(name="run-chain", cache_policy=NO_CACHE, persist_result=False, **EXECUTION_RETRIES)
@worker_logs_to_task
def run_chain_steps(config: ChainJobConfig) -> Execution:
    """Run all steps at once as one pipeline; rows resume at the step after their last saved one.

    Example:
        ```python
        @flow
        def curate(config: ChainJobConfig):
            connect_ray(config.ray_address)
            prepare_chain(config)
            run_chain_steps(config)
            return finalize_chain(config)
        ```
    """
    keys = {step.name: resolve_api_key(step.model) for step in config.steps}
    reporter = ProgressReporter(artifact_key("chain-progress", config.output), "Chain")
    execution = ChainJob(config, api_keys=keys).execute(on_progress=reporter)
    get_run_logger().info(
        "attempt %d: %d rows (%d results, %d errors) in %.1f s",
        execution.attempt,
        execution.rows,
        execution.results,
        execution.errors,
        execution.seconds,
    )
    return execution


@task(name="finalize-chain", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def finalize_chain(config: ChainJobConfig, execution: Execution | None = None, flow_run_id: str | None = None) -> Manifest:
    """Write results.jsonl, errors.jsonl and manifest.json (with per-step counts)."""
    return ChainJob(config).finalize(flow_run_id=flow_run_id, execution=execution)


@task(name="chain-job", cache_policy=JobCache(job=ChainJob), **JOB_RESULT)
def chain_job(config: ChainJobConfig, overwrite: bool = False) -> Manifest:
    """The whole chain (connect Ray, prepare, run, finalize) as one task whose result is the manifest;
    cached as `tasks.batch.batch_job` is (call it through `tasks.jobs.run_cached_job`)."""
    return run_lifecycle(config, overwrite, prepare=prepare_chain, run=run_chain_steps, finalize=finalize_chain)
