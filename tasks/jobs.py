"""A resumable job (batch, chain) as one Prefect task whose result is its manifest, cached.

The job task runs the lifecycle's tasks (connect Ray, prepare, run, finalize) and returns the
manifest. Its result is persisted (JSON, Prefect's result storage: `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`
or `PREFECT_LOCAL_STORAGE_PATH`), under a cache key made of what the lifecycle itself checks
before it resumes: the job kind, the output URL and the job's fingerprint (the config's
`resume_fingerprint()` plus the input's size and etag or mtime). A rerun of a completed job is
then a Cached task in the UI that returns the same manifest without connecting Ray or starting an
engine, and a changed input or config is another key, so the lifecycle decides (resume, refuse).

The cache never answers for an output that is not there as cached: `run_cached_job` reruns the
task (`refresh_cache`) when `overwrite` is set, when the output has no manifest.json, or when the
manifest.json there is not the cached one (the output was rewritten outside this cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from prefect import Task, get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.utilities.hashing import hash_objects

from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumableJob
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.runtime import connect_ray

# What the job task is declared with: its manifest is kept as JSON (readable anywhere, small).
JOB_RESULT: dict[str, Any] = dict(persist_result=True, result_serializer="json")
# What the flows are declared with: their typed result persisted with Prefect's default serializer
# (pickle). Not JSON: Prefect 3.7 stores a flow's result alone and reads a JSON file of a pydantic
# model (`{"__class__": ..., "data": ...}`) back as its old record format, handing callers a dict.
FLOW_RESULT: dict[str, Any] = dict(persist_result=True)


@dataclass
class JobCache(CachePolicy):
    """Cache key of a job task: kind, output and fingerprint (config + input version); None (no
    cache) when the fingerprint cannot be read (e.g. a missing input: the task runs and says why)."""

    job: type[ResumableJob] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.job is None or inputs.get("config") is None:
            return None
        config = inputs["config"]
        try:
            fingerprint = self.job(config).fingerprint()
        except Exception:
            return None
        return hash_objects("rayllm-job-v1", self.job.kind, config.output, fingerprint, raise_on_failure=False)


def current_flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def run_lifecycle(config: Any, overwrite: bool, *, prepare: Callable, run: Callable, finalize: Callable) -> Manifest:
    """Connect Ray, prepare (start, resume or refuse), run unless already complete, finalize."""
    connect_ray(config.ray_address, config.ray_block)
    preparation = prepare(config, overwrite)
    execution = None if preparation.already_complete else run(config)
    return finalize(config, execution, current_flow_run_id())


def run_cached_job(job_task: Task, job: type[ResumableJob], config: Any, overwrite: bool) -> Manifest:
    """Call `job_task(config, overwrite)`, from its cache when the output still holds the cached run.

    The task runs (and its new manifest replaces the cached one) when `overwrite` is set, when the
    output has no manifest.json, or when a cached manifest is not the manifest.json at the output.
    """
    on_disk = None if overwrite else job(config).completed_manifest()
    state = cast(State, job_task.with_options(refresh_cache=on_disk is None)(config, overwrite, return_state=True))
    manifest = cast(Manifest, state.result())
    if state.name == "Cached" and on_disk is not None and manifest.model_dump(mode="json") != on_disk.model_dump(mode="json"):
        get_run_logger().warning(
            "the cached manifest is not %s/manifest.json any more: running the job again", config.output.rstrip("/")
        )
        manifest = job_task.with_options(refresh_cache=True)(config, overwrite)
    return manifest
