"""Engines hosted by Ray Serve LLM, so one loaded model serves several steps, chains or jobs.

A model spec with `engine: serve` names a Serve application (`serve_app`, default
`rayllm-<model id>`). The first job that needs it deploys it (`LLMConfig` +
`build_llm_deployment`) and waits until it runs; a job that finds it running reuses it. A job
deletes only the applications it deployed itself, and only when `keep_serving` is false. Chains
running at the same time on one cluster share an engine by setting `keep_serving: true` (or by
deploying it beforehand), so that the first to finish does not take it from the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prefect_rayllm.rayllm_stages.config.models import ModelSpec

logger = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = 900.0
_POLL_S = 2.0


class EngineDeployFailed(RuntimeError):
    """A Serve-hosted engine did not start; the message carries Serve's reason."""


@dataclass(frozen=True)
class ServedEngine:
    app_name: str
    deployment_name: str
    model_id: str
    deployed_here: bool


def deployment_name_of(spec: ModelSpec) -> str:
    # build_llm_deployment names the deployment "LLMServer:<model id with / and . replaced>".
    return "LLMServer:" + spec.served_name.replace("/", "--").replace(".", "_")


def llm_config(spec: ModelSpec, gpu: bool):
    """The Ray Serve `LLMConfig` for `spec`: same engine defaults as the batch engine, replicas
    from `concurrency` (an int is fixed, (min, max) autoscales)."""
    from ray.serve.llm import LLMConfig

    from prefect_rayllm.rayllm_stages.llm.engines import engine_kwargs_for, placement_for

    # One engine may serve text steps and JSON steps alike: set it up for structured outputs.
    engine_kwargs = engine_kwargs_for(spec, gpu=gpu, structured_outputs=True)
    placement = placement_for(spec, gpu=gpu)
    low, high = spec.replica_bounds
    options: dict[str, Any] = dict(
        model_loading_config={"model_id": spec.served_name, "model_source": spec.source},
        engine_kwargs=engine_kwargs,
        deployment_config={"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": low}},
    )
    if placement is not None:
        options["placement_group_config"] = placement
    if spec.accelerator_type:
        options["accelerator_type"] = spec.accelerator_type
    return LLMConfig(**options)


def ensure_engine(spec: ModelSpec, gpu: bool, timeout_s: float = DEPLOY_TIMEOUT_S) -> ServedEngine:
    """Reuse the running application named by `spec`, or deploy it and wait until it runs.

    Raises:
        EngineDeployFailed: Serve reports the deployment failed, or it is not running in `timeout_s`.
    """
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    app, deployment = spec.serve_app_name, deployment_name_of(spec)
    engine = ServedEngine(app, deployment, spec.served_name, deployed_here=False)
    status = app_status(app)
    if status is not None and status.status == "RUNNING" and deployment in status.deployments:
        logger.info("reusing the Serve engine %s/%s", app, deployment)
        return engine
    if status is not None and status.status == "DEPLOYING" and deployment in status.deployments:
        wait_until_running(app, timeout_s)  # another job is deploying it: share, do not take over
        return engine
    _start_serve()
    logger.info("deploying the Serve engine %s/%s (%s)", app, deployment, spec.source)
    serve.run(build_llm_deployment(llm_config(spec, gpu)), name=app, route_prefix=None, blocking=False)
    try:
        wait_until_running(app, timeout_s)
    except EngineDeployFailed:
        delete_engine(app)
        raise
    return ServedEngine(app, deployment, spec.served_name, deployed_here=True)


def release_engine(engine: ServedEngine, keep_serving: bool) -> None:
    """Delete the application if this job deployed it and nobody asked to keep it."""
    if engine.deployed_here and not keep_serving:
        delete_engine(engine.app_name)


def delete_engine(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as exc:  # teardown must not hide the job's own outcome
        logger.warning("could not delete the Serve application %s: %s", app_name, exc)


def _start_serve() -> None:
    """Start Serve without an HTTP proxy unless it already runs (a batch engine needs no HTTP)."""
    from ray import serve

    if not serve_running():
        serve.start(proxy_location="Disabled")


def serve_running() -> bool:
    """Whether Serve runs on this cluster. `serve.status()` answers (empty) even when Serve was
    never started, so ask for its controller instead."""
    from prefect_rayllm.rayllm_stages.compat import ray_private

    return ray_private.serve_controller_running()


def app_status(app: str):
    from ray import serve

    try:
        return serve.status().applications.get(app)
    except Exception:  # Serve not started on this cluster yet
        return None


def wait_until_running(app: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = app_status(app)
        state = status.status if status is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise EngineDeployFailed(f"Serve application {app!r} is {state}: {_reasons(status)}")
        if time.monotonic() > deadline:
            raise EngineDeployFailed(
                f"Serve application {app!r} not running after {timeout_s:.0f} s (state {state}): {_reasons(status)}"
            )
        time.sleep(_POLL_S)


def _reasons(status) -> str:
    if status is None:
        return "no status"
    messages = [status.message] if status.message else []
    messages += [f"{name}: {d.message}" for name, d in status.deployments.items() if d.message]
    return "; ".join(messages) or "no message"
