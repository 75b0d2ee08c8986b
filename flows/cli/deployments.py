"""`rayllm deploy|serve`: the package's Prefect deployments, registered with an API or served from here."""

from __future__ import annotations

from pathlib import Path

import typer

from prefect_rayllm.flows.cli.app import DEPLOYMENTS
from prefect_rayllm.rayllm_stages.config.base import ConfigError

commands = typer.Typer()


@commands.command(rich_help_panel=DEPLOYMENTS)
def deploy(
    prefect_file: Path | None = typer.Option(
        None, "--prefect-file", exists=True, dir_okay=False, help="Default: deployments/prefect.yaml of this package."
    ),
    name: list[str] | None = typer.Option(None, "--name", "-n", help="Only this deployment (repeatable); default: all."),
    pool: str | None = typer.Option(None, "--pool", help="Work pool for every deployment (default: the file's)."),
) -> None:
    """Register the deployments with the Prefect API (PREFECT_API_URL).

    The deployments: batch, chain, nightly curation, weekly evaluation, rollout and its automation,
    against the configured Prefect API (PREFECT_API_URL: a server or Prefect Cloud).

    Creates the process work pool if missing, then runs `prefect --no-prompt deploy --all
    --prefect-file deployments/prefect.yaml`. Start a worker next: `RAYLLM_CHECKOUT=$PWD prefect
    worker start --pool rayllm`. Exit code 2: no Prefect API configured or a bad file; 1: deploy failed.
    """
    from prefect_rayllm.deployments.project import PREFECT_FILE
    from prefect_rayllm.deployments.project import deploy as deploy_all

    try:
        outcome = deploy_all(prefect_file or PREFECT_FILE, names=name or None, pool=pool)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except RuntimeError as exc:
        if "no Prefect API" in str(exc):
            raise ConfigError(str(exc)) from None
        raise
    typer.echo(outcome.stdout)


@commands.command(rich_help_panel=DEPLOYMENTS)
def serve(
    names: list[str] | None = typer.Argument(None, help="Deployments to serve (default: all)."),
    prefect_file: Path | None = typer.Option(
        None, "--prefect-file", exists=True, dir_okay=False, help="Default: deployments/prefect.yaml of this package."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many flow runs at once."),
    port: int = typer.Option(4200, "--port", help="Port of the local Prefect server, when one is started."),
) -> None:
    """Run the deployments, schedules and triggers included, from this process.

    `prefect.serve`: no work pool, no worker. Without PREFECT_API_URL, a local `prefect server start` (UI on
    http://127.0.0.1:4200) is started first, since Prefect's ephemeral server runs no scheduler.
    Ctrl-C stops serving (and pauses the schedules).
    """
    from prefect_rayllm.deployments.project import PREFECT_FILE
    from prefect_rayllm.deployments.serve import serve as serve_all

    try:
        serve_all(prefect_file or PREFECT_FILE, names or None, limit=limit, port=port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
