"""`rayllm api CONFIG.yaml`: the OpenAI-compatible Batch API (`/v1/files`, `/v1/batches`) on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from prefect_rayllm.flows.cli.app import DEPLOYMENTS, config_argument

commands = typer.Typer()


@commands.command(rich_help_panel=DEPLOYMENTS)
def api(
    config_file: Path = config_argument("API config"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port of the API."),
    serve: bool = typer.Option(
        True, "--serve/--no-serve", help="Run the batches in this process (default), or leave them to the work pool's workers."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="--serve: at most this many batches at once."),
    prefect_file: Path | None = typer.Option(
        None, "--prefect-file", exists=True, dir_okay=False, help="--serve: the prefect.yaml holding the batch deployment."
    ),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Port of the local Prefect server, when one is started."),
) -> None:
    """Serve OpenAI's Files and Batches API; each batch is a run of the batch deployment.

    Point an existing OpenAI batch script at it by changing base_url to http://HOST:PORT/v1. The
    request's body.model picks one of the config's models. Callers send the bearer key from
    api_key_env (default RAYLLM_API_KEY) or the Prefect Secret block api_key_secret.

    By default the batch deployment is served from this process (no worker; without
    PREFECT_API_URL a local Prefect server is started, UI on http://127.0.0.1:4200). With
    --no-serve, batches are runs of the registered deployment (`rayllm deploy`) for the work
    pool's workers. Files, batches and outputs live at the config's storage; a restart loses nothing.
    Exit code 2: a bad config or no key.
    """
    from prefect_rayllm.flows.api.config import load_api_config
    from prefect_rayllm.flows.api.server import run_api

    run_api(
        load_api_config(config_file),
        host=host,
        port=port,
        serve=serve,
        limit=limit,
        prefect_file=prefect_file,
        prefect_port=prefect_port,
    )
