"""`rayllm api`: the Batch API on one port and, unless a worker runs the batches, the batch
deployment served from the same process, so that one command gives a working endpoint.

    serve (default)   a Prefect runner in this process serves the batch deployment of prefect.yaml
                      (as `rayllm serve batch` would); without PREFECT_API_URL a local Prefect
                      server (UI at http://127.0.0.1:4200) is started first, as `rayllm serve` does
    --no-serve        batches are runs of the registered deployment (`rayllm deploy`), which a
                      work pool's worker executes; PREFECT_API_URL must point at that Prefect API

The process owns what it starts (`runtime.supervision`): when it stops, however it stops, the batch
runs it was executing stop with it, and are queued again (and resume from their committed rows) by
the next `rayllm api` serving the deployment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from prefect_rayllm.flows.api.config import ApiConfig, resolve_bearer_key
from prefect_rayllm.rayllm_stages.config.base import ConfigError

logger = logging.getLogger("prefect_rayllm.api")


def run_api(
    config: ApiConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    serve: bool = True,
    limit: int | None = None,
    prefect_file: str | Path | None = None,
    prefect_port: int = 4200,
) -> None:
    """Run the API (and the served batch deployment) until interrupted.

    Raises:
        ConfigError: no bearer key; the deployment is not in prefect.yaml (serve) or no Prefect API
            is configured (--no-serve).
    """
    from prefect_rayllm.deployments.project import PREFECT_FILE, deployment_specs
    from prefect_rayllm.deployments.serve import prefect_api, serving_environment, to_runner_deployment
    from prefect_rayllm.rayllm_stages.runtime import supervision

    supervision.supervise()  # first: it also stops what a killed predecessor left running
    key = None if config.api_key_secret else resolve_bearer_key(config)  # an unset variable fails before anything starts
    prefect_file = prefect_file or PREFECT_FILE
    specs = []
    if serve:
        try:
            specs = deployment_specs(prefect_file, [config.deployment])
        except ValueError as exc:
            raise ConfigError(f"deployment: {exc}") from None
        serving_environment(prefect_file, specs)
    elif not (os.environ.get("PREFECT_API_URL") or _profile_api_url()):
        raise ConfigError(
            "--no-serve: set PREFECT_API_URL to the Prefect API whose workers run the batch deployment "
            "(or leave out --no-serve to run the batches in this process)"
        )
    with prefect_api(prefect_port) as url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            key = key or resolve_bearer_key(config)
            serving_since = None
            if serve:
                serving_since = time.time()  # every state this process's runner sets is later
                start_runner(to_runner_deployment(specs[0]), limit)
            _serve_http(config, key, host, port, serving_since, url)


def _profile_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def start_runner(deployment, limit: int | None, timeout_s: float = 300.0) -> threading.Thread:
    """A Prefect runner serving `deployment` in a daemon thread; returns once the deployment is registered.

    It is never stopped cleanly on purpose: stopping a runner cancels its runs, and a batch must not
    read `cancelled` because the API restarted. Its runs end with this process and are resumed.
    """
    registered = threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        from prefect.runner import Runner

        runner = Runner(name=f"rayllm-api-{socket.gethostname()}-{os.getpid()}", limit=limit, pause_on_shutdown=False)
        await runner.aadd_deployment(deployment)
        registered.set()
        await runner.start()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported to the caller, or logged once serving
            failure.append(exc)
            if registered.is_set():
                logger.exception("the batch deployment's runner stopped")
        finally:
            registered.set()

    thread = threading.Thread(target=main, name="batch-runner", daemon=True)
    thread.start()
    if not registered.wait(timeout_s):
        raise RuntimeError(f"the batch deployment was not registered with the Prefect API within {timeout_s:.0f} s")
    if failure:
        raise RuntimeError(f"the batch deployment's runner did not start: {failure[0]}") from failure[0]
    return thread


def _serve_http(config: ApiConfig, key: str, host: str, port: int, serving_since: float | None, prefect_url: str) -> None:
    import uvicorn

    from prefect_rayllm.flows.api.app import create_app
    from prefect_rayllm.flows.api.runs import BatchRuns

    runs = BatchRuns(config.deployment, serving_since=serving_since, stale_after_s=config.stale_after_s)
    app = create_app(config, key, runs)
    source = (
        f"Prefect Secret block {config.api_key_secret!r}" if config.api_key_secret else (config.api_key_env or "RAYLLM_API_KEY")
    )
    mode = "served from this process" if serving_since is not None else "run by the deployment's workers"
    print(
        f"Batch API at http://{host}:{port}/v1 (bearer key from {source}); models: {', '.join(sorted(config.models))}; "
        f"batches are runs of {config.deployment} ({mode}); Prefect API {prefect_url}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
