"""The root of the `rayllm` command: the Typer app, its help panels, `--version`, and the one place
where every command's errors become a message and an exit code.

Exit codes, for every command: 0 done; 1 the run (or the operation) failed; 2 a bad config, input
or argument. A config or input error is one message on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from prefect_rayllm.flows.console import FORMAT_ENV, LogFormat, start_command
from prefect_rayllm.rayllm_stages.config.base import ConfigError

# Help panels: what a command is for.
JOBS = "Jobs"
ENDPOINTS = "Endpoints"
DEPLOYMENTS = "Deployments"
LOCAL_TOOLS = "Local tools"

console = Console(stderr=True, soft_wrap=True)  # messages whole: a path is never cut


class CommandFailed(Exception):
    """An expected failure (a version not running, an endpoint not found): `error: <message>`, exit 1."""


class _Commands(TyperGroup):
    """The root command group: whatever a command raises ends here, once for all commands."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # exit codes, Ctrl-C, usage errors
            raise
        except ConfigError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except CommandFailed as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        except Exception as exc:
            console.print(
                f"[red]{escape(ctx.invoked_subcommand or 'rayllm')} failed:[/] {type(exc).__name__}: {escape(str(exc))}"
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    name="rayllm",
    cls=_Commands,
    help="Prefect flows over Ray Data LLM and Ray Serve LLM: batch inference, curation, chains, evaluation, rollout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"prefect-rayllm {version('prefect-rayllm')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    log_format: LogFormat = typer.Option(
        LogFormat.progress,
        "--log-format",
        envvar=FORMAT_ENV,
        help="progress: a progress bar or a line per step, then a summary; text: Prefect's log lines; json: log lines as JSON.",
    ),
) -> None:
    """Prefect flows over Ray Data LLM and Ray Serve LLM: batch inference, curation, chains, evaluation, rollout.

    Exit codes: 0 done; 1 the run failed; 2 a bad config, input or argument.
    """
    # Before the command starts anything: its console, and a watchdog that stops whatever it
    # starts when it ends, however it ends (SIGKILL too).
    start_command(log_format, supervise=not {"--help", "-h"} & set(sys.argv[1:]))


class Kind(StrEnum):
    """A job kind, as `--kind` takes it."""

    batch = "batch"
    chain = "chain"
    evaluation = "evaluation"
    curation = "curation"
    rollout = "rollout"


def config_argument(what: str) -> Any:
    return typer.Argument(..., exists=True, dir_okay=False, help=f"{what} (YAML).")


def load_checked(kind: str, path: Path, overrides: dict[str, Any] | None = None, overwrite: bool = False) -> Any:
    """Load a job's config and check its input and its output's earlier run, before anything starts
    (no Ray, no Prefect server): a missing input, a key that does not fit, or an output holding a run
    with other settings fails here, in about a second, as one message.

    A config naming blocks (`storage_block`, `ray_block`) needs Prefect's API here: the blocks are
    read (a missing one is that one message) and, for `ray_block`, Ray is connected as the block
    says. The config returned still names the blocks: it becomes the flow's parameters."""
    from prefect_rayllm.rayllm_stages.config.base import storage_blocks
    from prefect_rayllm.rayllm_stages.jobs.kinds import check_job, check_resume, load_job_config

    _, config = load_job_config(path, kind, {k: v for k, v in (overrides or {}).items() if v is not None})
    checked = config
    if storage_blocks(config):
        from prefect_rayllm.tasks.blocks import with_storage_credentials

        checked = with_storage_credentials(config)
    check_job(kind, checked)
    check_resume(kind, checked, overwrite)
    if getattr(config, "ray_block", None):
        from prefect_rayllm.tasks.blocks import connect_ray_block
        from prefect_rayllm.tasks.runtime import ray_worker_env

        connect_ray_block(config.ray_block, env_vars=ray_worker_env())  # the flow's own start then reuses it
    return config
