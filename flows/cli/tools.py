"""Local tools: `rayllm validate` (any job config, no engine), `rayllm demo`, and the builders of the
tiny models and image corpus that the examples and tests use (`prefect_rayllm.rayllm_stages.testing`)."""

from __future__ import annotations

from pathlib import Path

import typer

from prefect_rayllm.flows.cli.app import LOCAL_TOOLS, Kind, config_argument, console

commands = typer.Typer()


@commands.command(rich_help_panel=LOCAL_TOOLS)
def validate(
    config_file: Path = config_argument("Job config of any kind"),
    kind: Kind | None = typer.Option(None, "--kind", help="The job kind; default: told from the file's keys."),
    check_input: bool = typer.Option(
        True, "--input/--no-input", help="Also check the input as the job would (exists, format, first lines, fields)."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="An input or model folder that is not there (or not reachable from here) is an error, not a warning.",
    ),
) -> None:
    """Check a job config of any kind and its input; starts nothing (a config naming a storage block
    reads it from Prefect's API).

    Batch, chain, evaluation, curation or rollout (told from the keys, or --kind): the keys and
    values, then the input as `rayllm <job>` checks it before it starts Ray, Prefect or an engine.
    An input that is not there yet (a model to build, data on the cluster's storage) is a warning
    unless --strict; an input that is there and unfit is an error.

    Exit code 0: valid; 2: a bad key (named, with its line), an unfit input (or, with --strict, a missing one).
    """
    from prefect_rayllm.rayllm_stages.config.base import InputUnavailable, storage_blocks
    from prefect_rayllm.rayllm_stages.jobs.kinds import check_job, load_job_config

    found, config = load_job_config(config_file, kind.value if kind else None)
    if not check_input:
        typer.echo(f"ok: {config_file} is a valid {found} config (input not checked)")
        return
    if storage_blocks(config):  # the input is read with the block's credentials: Prefect's API is asked for them
        from prefect_rayllm.tasks.blocks import with_storage_credentials

        config = with_storage_credentials(config)
    try:
        summary = check_job(found, config, count=True)
    except InputUnavailable as exc:
        if strict:
            raise
        typer.echo(f"ok: {config_file} is a valid {found} config (input not checked)")
        typer.echo(f"warning: {exc}", err=True)
        return
    typer.echo(f"ok: {config_file} is a valid {found} config; {summary}")


@commands.command(rich_help_panel=LOCAL_TOOLS)
def demo(
    workdir: Path = typer.Option(Path(".rayllm/demo"), help="Where the model and a copy of the outputs go."),
    rows: int = typer.Option(200, min=1, help="Requests in the sample batch file."),
    ui: bool = typer.Option(
        False, "--ui", help="Run against a local Prefect server that stays up afterwards (its database in WORKDIR/prefect)."
    ),
    ui_port: int = typer.Option(4200, help="--ui: the server's port (one already answering there is reused)."),
    stop_ui: bool = typer.Option(False, "--stop-ui", help="Stop the server an earlier `--ui` started, and exit."),
) -> None:
    """Everything local: an S3 server on loopback, a tiny model, a sample batch file, the flow, the report."""
    from prefect_rayllm.flows.demo import run_demo
    from prefect_rayllm.flows.local import quiet_ray_logs
    from prefect_rayllm.flows.ui_server import start_ui_server, stop_ui_server

    home = workdir.resolve() / "prefect"
    if stop_ui:
        typer.echo("stopped the demo's Prefect server" if stop_ui_server(home) else "no demo Prefect server was running")
        return
    quiet_ray_logs()
    if not ui:
        run_demo(workdir, rows=rows, console=console)
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, started = start_ui_server(home, ui_port)
    console.print(f"Prefect server {'started' if started else 'already running'} at {url}")
    with temporary_settings({PREFECT_API_URL: url}):
        run_demo(workdir, rows=rows, console=console)
    ui_url = url.removesuffix("/api")
    console.print(
        f"\n[bold]Open {ui_url}/runs[/]: the demo's flow runs (batch, evaluation, curation) with their "
        f"artifacts (summary, report, contact sheet), task runs and logs. The server keeps running; "
        f"stop it with `rayllm demo --stop-ui --workdir {workdir}`."
    )


@commands.command("make-tiny-model", rich_help_panel=LOCAL_TOOLS)
def make_tiny_model(
    directory: Path = typer.Argument(..., help="Folder to write the model into."),
    trained: bool = typer.Option(False, "--trained/--untrained", help="Fit it to the toy colour task first (seconds)."),
    seed: int = typer.Option(0, help="Seed for weights and training."),
    task: str = typer.Option(
        "colours", help="--trained: 'colours' answers colour questions; 'rewrite' turns a colour into that question."
    ),
    vision: bool = typer.Option(
        False, "--vision", help="A tiny vision-language model (Idefics3, random weights) for image curation."
    ),
) -> None:
    """Write a tiny chat model (tokenizer + 2-layer Llama, ~2 MB) that vLLM loads by path.

    --trained answers the toy task ("Is red warm or cool?" -> "warm") exactly with greedy decoding;
    the untrained twin answers gibberish. Needs the cpu or gpu extra (torch, transformers).
    """
    from prefect_rayllm.rayllm_stages.testing.tiny_models import REWRITE_TASK, TOY_TASK, build_tiny_chat_model

    if vision:
        from prefect_rayllm.rayllm_stages.testing.tiny_vision import build_tiny_vision_model

        typer.echo(str(build_tiny_vision_model(directory, seed=seed)))
        return
    tasks = {"colours": TOY_TASK, "rewrite": REWRITE_TASK}
    if task not in tasks:
        raise typer.BadParameter(f"must be one of {', '.join(tasks)}", param_hint="--task")
    typer.echo(str(build_tiny_chat_model(directory, trained=trained, seed=seed, task=tasks[task])))


@commands.command("make-image-corpus", rich_help_panel=LOCAL_TOOLS)
def make_image_corpus(
    folder: str = typer.Argument(..., help="Folder (any fsspec URL) to write images/ and manifest.jsonl into."),
) -> None:
    """Write a small image corpus (good, broken and duplicate images) to try `rayllm curate` on."""
    from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus

    corpus = build_corpus(folder)
    typer.echo(
        f"{len(corpus.expected) - 1} images in {corpus.images_url}; manifest (with one missing key): {corpus.manifest_url}"
    )
