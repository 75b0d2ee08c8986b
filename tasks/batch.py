"""Batch inference tasks: prepare, run, finalize. Each is safe to retry; a retried run resumes."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob, Execution, Preparation
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.jobs import JOB_RESULT, JobCache, run_lifecycle
from prefect_rayllm.tasks.progress import ProgressReporter
from prefect_rayllm.tasks.reporting import artifact_key
from prefect_rayllm.tasks.runtime import worker_logs_to_task
from prefect_rayllm.tasks.secrets import resolve_api_key


def _retry_unless_config_error(task, task_run, state) -> bool:
    """Storage hiccups are worth a retry; a config that cannot work is not."""
    try:
        state.result()
    except ConfigError:
        return False
    except Exception:
        return True
    return True


STORAGE_RETRIES: dict[str, Any] = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_unless_config_error,
)


@task(name="prepare-batch", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def prepare_batch(config: BatchJobConfig, overwrite: bool = False) -> Preparation:
    """Check the input against the config and decide: start, resume, or refuse.

    Raises:
        ConfigError: the input is missing or does not fit the config; the field is named.
        ResumeRefused: the output holds a run with other settings and `overwrite` is False.

    Example:
        ```python
        @flow
        def check(config: BatchJobConfig):
            return prepare_batch(config)
        ```
    """
    preparation = BatchJob(config).prepare(overwrite=overwrite)
    logger = get_run_logger()
    if preparation.already_complete:
        logger.info("%s is already complete (%d rows)", config.output, preparation.total_rows)
    elif preparation.resumed:
        logger.info("resuming %s: %d of %d rows already done", config.output, preparation.done_rows, preparation.total_rows)
    else:
        logger.info("starting %s: %d rows (%s)", config.output, preparation.total_rows, preparation.input_format)
    return preparation


# A retry of an execution step resumes from the committed rows; it does not start over.
EXECUTION_RETRIES: dict[str, Any] = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_unless_config_error,
)


@task(name="run-batch", cache_policy=NO_CACHE, persist_result=False, **EXECUTION_RETRIES)
@worker_logs_to_task
def run_batch(config: BatchJobConfig) -> Execution:
    """Run every row not yet committed through the engine; a retry picks up where this stopped.

    Example:
        ```python
        @flow
        def infer(config: BatchJobConfig):
            connect_ray(config.ray_address)
            prepare_batch(config)
            run_batch(config)
            return finalize_batch(config)
        ```
    """
    reporter = ProgressReporter(artifact_key("batch-progress", config.output), f"Batch {config.model.served_name}")
    execution = BatchJob(config, api_key=resolve_api_key(config.model)).execute(on_progress=reporter)
    get_run_logger().info(
        "attempt %d: %d rows (%d results, %d errors) in %.1f s",
        execution.attempt,
        execution.rows,
        execution.results,
        execution.errors,
        execution.seconds,
    )
    return execution


@task(name="finalize-batch", cache_policy=NO_CACHE, persist_result=False, **STORAGE_RETRIES)
def finalize_batch(config: BatchJobConfig, execution: Execution | None = None, flow_run_id: str | None = None) -> Manifest:
    """Write results.jsonl, errors.jsonl and manifest.json from the committed parts."""
    return BatchJob(config).finalize(flow_run_id=flow_run_id, execution=execution)


@task(name="batch-job", cache_policy=JobCache(job=BatchJob), **JOB_RESULT)
def batch_job(config: BatchJobConfig, overwrite: bool = False) -> Manifest:
    """The whole batch job (connect Ray, prepare, run, finalize) as one task whose result is the manifest.

    Cached on the output, the settings and the input's version (`tasks.jobs.JobCache`): call it
    through `tasks.jobs.run_cached_job`, which bypasses the cache on `overwrite` or a changed output.
    """
    return run_lifecycle(config, overwrite, prepare=prepare_batch, run=run_batch, finalize=finalize_batch)
