"""Serve every deployment of prefect.yaml from this process with `prefect.serve`: no work
pool, no worker. Schedules, triggers, parameters, tags and concurrency limits come from prefect.yaml.

    python -m prefect_rayllm.deployments.serve                 # or: rayllm serve
    python -m prefect_rayllm.deployments.serve batch nightly   # only these deployments

With no PREFECT_API_URL set, a local `prefect server start` is started first (UI at
http://127.0.0.1:4200, SQLite under PREFECT_HOME) and stopped on exit: Prefect's ephemeral server
runs no scheduler, so schedules would never fire without it. A server already answering there is
reused.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect_rayllm.deployments.project import PREFECT_FILE, RETRY_ENV, DeploymentSpec, deployment_specs
from prefect_rayllm.deployments.served import PREFECT_FILE_ENV
from prefect_rayllm.deployments.server import LocalPrefectServer, api_healthy

DEFAULT_PORT = 4200


def runner_deployments(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None) -> list[Any]:
    """The deployments of prefect.yaml as `prefect.serve` takes them (RunnerDeployment objects)."""
    return [to_runner_deployment(spec) for spec in deployment_specs(prefect_file, names)]


def to_runner_deployment(spec: DeploymentSpec):
    """One prefect.yaml entry as a RunnerDeployment served from this process.

    Its entrypoint is `prefect_rayllm.deployments.served.<name>`: each run imports the flow afresh in a
    subprocess, configured as on a worker (flow retries included). There are no pull steps: the
    code is the one installed here.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    limit = spec.concurrency_limit
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(limit=limit["limit"], collision_strategy=limit.get("collision_strategy", "ENQUEUE"))
    deployment = spec.configured_flow().to_deployment(
        name=spec.name,
        schedules=[_schedule(s) for s in spec.schedules] or None,
        parameters=spec.parameters,
        description=spec.description,
        tags=spec.tags,
        concurrency_limit=limit,
        triggers=[DeploymentEventTrigger(**trigger) for trigger in spec.triggers] or None,
        enforce_parameter_schema=True,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment.entrypoint = f"prefect_rayllm.deployments.served.{spec.name}"  # a module path: no storage to pull
    return deployment


def _schedule(item: dict[str, Any]):
    from prefect.schedules import Cron, Interval, RRule

    options = {k: item[k] for k in ("timezone", "slug", "active") if k in item}
    if "cron" in item:
        return Cron(item["cron"], day_or=item.get("day_or", True), **options)
    if "interval" in item:
        return Interval(float(item["interval"]), **options)
    return RRule(item["rrule"], **options)


def serve(
    prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None, limit: int | None = None, port: int = DEFAULT_PORT
) -> None:
    """Serve the deployments until interrupted, starting a local Prefect server when none is configured."""
    specs = deployment_specs(prefect_file, names)
    serving_environment(prefect_file, specs)
    with prefect_api(port) as url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            _run(specs, limit)


def serving_environment(prefect_file: str | Path, specs: list[DeploymentSpec]) -> None:
    """The environment served runs need: the prefect.yaml their entrypoints read, and the job
    environment the work pool would set (e.g. RAYLLM_RAY_LOG_LEVEL; flow retries come from the entrypoint)."""
    os.environ[PREFECT_FILE_ENV] = str(Path(prefect_file).resolve())
    for spec in specs:
        for key, value in spec.env.items():
            if key not in RETRY_ENV:
                os.environ.setdefault(key, value)


@contextmanager
def prefect_api(port: int = DEFAULT_PORT) -> Iterator[str]:
    """The Prefect API URL to use, also set as PREFECT_API_URL for this process and its children:
    the configured one, else a local server on `port` (reused when one answers there, else started
    here with the UI and stopped on exit; a SIGTERM then stops the caller the way Ctrl-C does)."""
    from prefect.settings import PREFECT_API_URL

    server = None
    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        url = f"http://127.0.0.1:{port}/api"
        if not api_healthy(url):
            server = LocalPrefectServer(port=port, ui=True)
            print(
                f"starting a local Prefect server at {server.ui_url} (PREFECT_HOME: "
                f"{os.environ.get('PREFECT_HOME', '~/.prefect')}) …",
                file=sys.stderr,
            )
            server.start()
            signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ["PREFECT_API_URL"] = url
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # threads without a settings context of their own read this one
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


def _run(specs: list[DeploymentSpec], limit: int | None) -> None:
    import prefect

    prefect.serve(*[to_runner_deployment(spec) for spec in specs], limit=limit)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m prefect_rayllm.deployments.serve")
    parser.add_argument("names", nargs="*", help="deployments to serve (default: all)")
    parser.add_argument("--prefect-file", default=str(PREFECT_FILE))
    parser.add_argument("--limit", type=int, default=None, help="at most this many runs at once")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the local server when one is started")
    args = parser.parse_args(argv)
    serve(args.prefect_file, args.names or None, args.limit, args.port)


if __name__ == "__main__":
    main()
