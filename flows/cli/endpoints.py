"""`rayllm endpoint status|scale|teardown`: operate endpoints a rollout put on a Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from prefect_rayllm.flows.cli.app import ENDPOINTS, CommandFailed, config_argument

commands = typer.Typer()
endpoint_app = typer.Typer(help="Operate rolled-out endpoints: status, scale and teardown.", no_args_is_help=True)
commands.add_typer(endpoint_app, name="endpoint", rich_help_panel=ENDPOINTS)


@endpoint_app.command("status")
def endpoint_status(
    name: str = typer.Argument(..., help="Endpoint name (the router application)."),
    ray_address: str = typer.Option("auto", "--ray-address", help="The cluster serving it."),
) -> None:
    """The endpoint's router, primary version, traffic weights and version applications."""
    from prefect_rayllm.rayllm_stages.rollout.endpoints import endpoint_status as read_status

    _connect_quietly(ray_address)
    status = read_status(name)
    if status.router is None and not status.versions:
        raise CommandFailed(f"no endpoint named {name!r} on this cluster")
    typer.echo(status.model_dump_json(indent=2))


@endpoint_app.command("teardown")
def endpoint_teardown(
    name: str = typer.Argument(..., help="Endpoint name (the router application)."),
    ray_address: str = typer.Option("auto", "--ray-address", help="The cluster serving it."),
) -> None:
    """Delete the endpoint's router and every version application."""
    from prefect_rayllm.rayllm_stages.rollout.endpoints import teardown

    _connect_quietly(ray_address)
    deleted = teardown(name)
    typer.echo("deleted: " + (", ".join(deleted) or "nothing"))


@endpoint_app.command("scale")
def endpoint_scale(
    config_file: Path = config_argument("The rollout config that deployed the version"),
    min_replicas: int = typer.Option(..., "--min", min=0, help="Fewest engine replicas."),
    max_replicas: int = typer.Option(..., "--max", min=1, help="Most engine replicas."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="The cluster serving it; default the config's, else 'auto'."
    ),
) -> None:
    """Change the autoscaling bounds of the running version a rollout config deployed, in place:
    its replicas keep serving, nothing reloads. Exit 1 when that version is not running."""
    from prefect_rayllm.rayllm_stages.config.base import load_config
    from prefect_rayllm.rayllm_stages.llm.engines import cluster_has_gpu
    from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig
    from prefect_rayllm.rayllm_stages.rollout.endpoints import scale_version

    config = load_config(RolloutConfig, config_file)
    _connect_quietly(ray_address or config.ray_address or "auto")
    try:
        info = scale_version(config, min_replicas, max_replicas, cluster_has_gpu())
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None
    typer.echo(f"{info.app}: {min_replicas}..{max_replicas} replicas")


def _connect_quietly(ray_address: str) -> None:
    """Operator commands: join the cluster without its workers' logs on this console."""
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
    ray_runtime.connect(ray_address)
