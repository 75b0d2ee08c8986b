"""Serve every deployment of prefect.yaml from this process, as `prefect.serve` does: no work
pool, no worker. Schedules, triggers, parameters, tags and concurrency limits come from prefect.yaml.

    python -m deployments.serve                 # or: rayllm serve
    python -m deployments.serve batch nightly   # only these deployments

With no PREFECT_API_URL set, a local `prefect server start` is started first (UI at
http://127.0.0.1:4200, SQLite under PREFECT_HOME) and stopped on exit: Prefect's ephemeral server
runs no scheduler, so schedules would never fire without it. A server already answering there is
reused.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from deployments.project import PREFECT_FILE, RETRY_ENV, DeploymentSpec, deployment_specs
from deployments.server import LocalPrefectServer, api_healthy

DEFAULT_PORT = 4200


def runner_deployments(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None,
                       name_suffix: str = "") -> list[Any]:
    """`flow.to_deployment(...)` for each deployment of prefect.yaml (what `prefect.serve` takes)."""
    return [to_runner_deployment(spec, name_suffix) for spec in deployment_specs(prefect_file, names)]


def to_runner_deployment(spec: DeploymentSpec, name_suffix: str = ""):
    """One prefect.yaml entry as a RunnerDeployment (what `flow.to_deployment` gives)."""
    flow, options = served_flow(spec)
    return flow.to_deployment(name=spec.name + name_suffix, **options)


def served_flow(spec: DeploymentSpec) -> tuple[Any, dict[str, Any]]:
    """The flow of one prefect.yaml entry and its deployment options, for a Runner in this process.

    The runs execute the flow object in a subprocess of this process (no pull steps: the code is
    the one installed here). The retries a worker would get from the work pool's environment
    (PREFECT_FLOWS_DEFAULT_RETRIES...) are set on that flow object.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    flow = spec.load_flow()
    env = spec.env
    if RETRY_ENV[0] in env:
        flow = flow.with_options(retries=int(env[RETRY_ENV[0]]), retry_delay_seconds=float(env.get(RETRY_ENV[1], 0)))
    limit = spec.concurrency_limit
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(limit=limit["limit"], collision_strategy=limit.get("collision_strategy", "ENQUEUE"))
    return flow, dict(
        schedules=[_schedule(s) for s in spec.schedules] or None,
        parameters=spec.parameters,
        description=spec.description,
        tags=spec.tags,
        concurrency_limit=limit,
        triggers=[DeploymentEventTrigger(**trigger) for trigger in spec.triggers] or None,
        enforce_parameter_schema=True,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _schedule(item: dict[str, Any]):
    from prefect.schedules import Cron, Interval, RRule

    options = {k: item[k] for k in ("timezone", "slug", "active") if k in item}
    if "cron" in item:
        return Cron(item["cron"], day_or=item.get("day_or", True), **options)
    if "interval" in item:
        return Interval(float(item["interval"]), **options)
    return RRule(item["rrule"], **options)


def serve(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None, limit: int | None = None,
          port: int = DEFAULT_PORT) -> None:
    """Serve the deployments until interrupted, starting a local Prefect server when none is configured."""
    from prefect.settings import PREFECT_API_URL

    specs = deployment_specs(prefect_file, names)
    for spec in specs:  # the job environment the work pool would set (e.g. RAYLLM_RAY_LOG_LEVEL)
        for key, value in spec.env.items():
            if key not in RETRY_ENV:
                os.environ.setdefault(key, value)
    server = None
    if not os.environ.get("PREFECT_API_URL") and not PREFECT_API_URL.value():
        local_url = f"http://127.0.0.1:{port}/api"
        if not api_healthy(local_url):
            server = LocalPrefectServer(port=port, ui=True)
            print(f"starting a local Prefect server at {server.ui_url} (PREFECT_HOME: "
                  f"{os.environ.get('PREFECT_HOME', '~/.prefect')}) …", file=sys.stderr)
            server.start()
            # A SIGTERM stops serving the way Ctrl-C does, so that the server below stops too.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        os.environ["PREFECT_API_URL"] = local_url
    try:
        from prefect.settings import temporary_settings

        with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            _run(specs, limit)
    finally:
        if server is not None:
            server.stop()


def _run(specs: list[DeploymentSpec], limit: int | None) -> None:
    """`prefect.serve`, with the flow objects registered, so that each run executes the flow as
    configured here (retries included) rather than re-importing it."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(limit=limit, pause_on_shutdown=True)
    names = []
    for spec in specs:
        flow, options = served_flow(spec)
        runner.add_flow(flow, name=spec.name, **options)
        names.append(f"{flow.name}/{spec.name}")
    print("serving (schedules and triggers included): " + ", ".join(names) + f" on {os.environ['PREFECT_API_URL']}",
          file=sys.stderr, flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        print("stopped serving", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m deployments.serve")
    parser.add_argument("names", nargs="*", help="deployments to serve (default: all)")
    parser.add_argument("--prefect-file", default=str(PREFECT_FILE))
    parser.add_argument("--limit", type=int, default=None, help="at most this many runs at once")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the local server when one is started")
    args = parser.parse_args(argv)
    serve(args.prefect_file, args.names or None, args.limit, args.port)


if __name__ == "__main__":
    main()
