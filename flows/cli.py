"""The `rayllm` command: run jobs from YAML configs, build tiny local models, run the local demo."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prefect_rayllm.rayllm_stages.config.base import ConfigError, load_config
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig, ChainJobConfig

app = typer.Typer(
    name="rayllm",
    help="Prefect flows over Ray Data LLM and Ray Serve LLM: batch inference, curation, chains, evaluation, rollout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"prefect-rayllm {version('prefect-rayllm')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Prefect flows over Ray Data LLM and Ray Serve LLM: batch inference, curation, chains, evaluation, rollout."""


def _quiet_ray_logs() -> None:
    # Ray actors and vLLM print a lot to the driver; the progress bar says what matters.
    os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if os.environ["RAYLLM_RAY_LOGS"] == "0":
        import logging

        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_runtimes(ray_address: str | None) -> None:
    """Start Prefect's ephemeral server (when no PREFECT_API_URL is set) while Ray starts.

    Both take seconds; the flow would otherwise start them one after the other.
    """
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    background = [threading.Thread(target=_import_engine_stack, name="import-engine-stack", daemon=True)]
    if not PREFECT_API_URL.value() and PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        from prefect.server.api.server import SubprocessASGIServer

        background.append(threading.Thread(target=SubprocessASGIServer().start, name="prefect-server-start", daemon=True))
    for thread in background:
        thread.start()
    ray_runtime.connect(ray_address)
    for thread in background:
        thread.join()


def _import_engine_stack() -> None:
    """Import Ray's vLLM stage (torch, transformers, vLLM: seconds) while Ray starts; the
    processor build would import it anyway. Without vLLM installed (HTTP-only) it is skipped."""
    import importlib

    try:
        importlib.import_module("ray.llm._internal.batch.stages.vllm_engine_stage")
    except ImportError:
        pass


def run_batch_with_progress(config: BatchJobConfig, overwrite: bool, show_progress: bool = True):
    """Run the batch flow in this process with a progress bar on stderr; returns the manifest."""
    from prefect_rayllm.flows.batch import batch_inference

    return run_with_progress(batch_inference, "batch", config, overwrite, show_progress)


def run_with_progress(flow_fn, label: str, config, overwrite: bool, show_progress: bool = True):
    """Run a job flow in this process with a progress bar on stderr; returns the manifest."""
    from prefect_rayllm.tasks.progress import progress_listener

    start_runtimes(config.ray_address)
    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        task_id = bar.add_task("rows", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        with progress_listener(update):
            return flow_fn(config=config, overwrite=overwrite)


@app.command()
def batch(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job config (YAML)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over when the output holds a run with other settings."),
    input: str | None = typer.Option(None, "--input", help="Override the config's input URL."),
    output: str | None = typer.Option(None, "--output", help="Override the config's output URL."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="'auto' or ray://host:10001; default local Ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run batch inference on an OpenAI Batch JSONL file or a JSONL/Parquet table.

    Writes results.jsonl, errors.jsonl and manifest.json to the output location; a rerun on the
    same output resumes. Exit code 2: bad config or input; 1: the run failed.
    """
    from prefect_rayllm.flows.batch import batch_inference

    _run_job_command(batch_inference, "batch", BatchJobConfig, config_file, overwrite, input, output, ray_address, progress)


@app.command()
def chain(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Chain config (YAML)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over when the output holds a run with other settings."),
    input: str | None = typer.Option(None, "--input", help="Override the config's input URL."),
    output: str | None = typer.Option(None, "--output", help="Override the config's output URL."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="'auto' or ray://host:10001; default local Ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run a multi-model chain over a JSONL/Parquet table: each step has its own model and prompt,
    and reads the input columns and earlier steps' outputs. All steps run at once.

    Writes results.jsonl (input columns + every step's output), errors.jsonl (with the failed step)
    and manifest.json; a rerun on the same output resumes, per step. Exit code 2: bad config or
    input; 1: the run failed.
    """
    from prefect_rayllm.flows.chain import run_chain

    _run_job_command(run_chain, "chain", ChainJobConfig, config_file, overwrite, input, output, ray_address, progress)


def _run_job_command(flow_fn, label, model, config_file, overwrite, input, output, ray_address, progress) -> None:
    overrides = {k: v for k, v in {"input": input, "output": output, "ray_address": ray_address}.items() if v}
    config = _load(model, config_file, overrides)
    _quiet_ray_logs()
    try:
        manifest = run_with_progress(flow_fn, label, config, overwrite, show_progress=progress)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:
        console.print(f"[red]{label} failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    counts = manifest.counts
    console.print(
        f"[green]done:[/] {counts.completed} completed, {counts.failed} failed of {counts.total}; "
        f"{manifest.throughput.rows_per_s} rows/s"
    )
    for name, url in manifest.outputs.items():
        typer.echo(f"{name}: {url}")


@app.command()
def evaluate(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Evaluation config (YAML)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over when the output holds answers made with other settings."
    ),
    output: str | None = typer.Option(None, "--output", help="Override the config's output URL."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="'auto' or ray://host:10001; default local Ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Evaluate one or more models or endpoints on a dataset: metrics with bootstrap intervals,
    an optional LLM judge, deltas against a baseline, and a gate.

    Writes scores.jsonl, metrics.json, report.md and plots/ to the output location. Exit code 0:
    the gate passed; 1: the gate (or the run) failed; 2: bad config or dataset.
    """
    from prefect_rayllm.flows.evaluation import evaluate as evaluate_flow
    from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig

    overrides = {k: v for k, v in {"output": output, "ray_address": ray_address}.items() if v}
    config = _load(EvaluationConfig, config_file, overrides)
    _quiet_ray_logs()
    try:
        result = run_with_progress(evaluate_flow, "evaluate", config, overwrite, show_progress=progress)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:
        _print_verdicts(config.output, config.storage_options)
        console.print(f"[red]evaluate failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    _print_verdicts(config.output, config.storage_options)
    console.print(f"[green]{'passed' if result.passed else 'gate failed (fail_flow is off)'}[/]")
    for name, url in result.outputs.items():
        if not name.startswith("plot:"):
            typer.echo(f"{name}: {url}")


def _print_verdicts(output: str, storage_options: dict) -> None:
    """The per-target summary and gate of the run's metrics.json, if it got that far."""
    from rich.table import Table

    from prefect_rayllm.rayllm_stages.evaluation.run import EvaluationResult
    from prefect_rayllm.rayllm_stages.io.storage import Location

    metrics = Location(output, storage_options).child("metrics.json")
    if not metrics.exists():
        return
    result = EvaluationResult.model_validate(metrics.read_json())
    table = Table("target", "metric", "mean", "interval", "gate")
    for name, summary in result.summaries.items():
        verdict = result.verdicts[name]
        for metric, value in summary.metrics.items():
            checks = [c for c in verdict.checks if c.metric == metric]
            gate = ", ".join(("pass " if c.passed else "FAIL ") + c.name for c in checks)
            mean = "-" if value.mean is None else f"{value.mean:.3f}"
            interval = "-" if value.ci_low is None else f"[{value.ci_low:.3f}, {value.ci_high:.3f}]"
            table.add_row(name, metric, mean, interval, gate)
        table.add_row(name, "(examples failed)", f"{summary.failed}/{summary.examples}", "", "pass" if verdict.passed else "FAIL")
    console.print(table)


@app.command()
def curate(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Curation config (YAML)."),
    output: str | None = typer.Option(None, "--output", help="Override the config's output URL."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="'auto' or ray://host:10001; default local Ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over when the output holds a run with other images or settings."
    ),
) -> None:
    """Curate images from an S3 prefix or a manifest: fetch, decode, VLM caption and scores, rules, dedup.

    Writes curated.parquet, rejected.parquet (uri, stage, reason), contact_sheet.png and
    manifest.json. A rerun on the same output resumes. Exit code 2: bad config; 1: the run failed.
    """
    from prefect_rayllm.flows.curation import curate_images
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig

    overrides = {k: v for k, v in {"output": output, "ray_address": ray_address}.items() if v}
    config = _load(CurationConfig, config_file, overrides)
    _quiet_ray_logs()
    try:
        manifest = run_with_progress(curate_images, "curate", config, overwrite, show_progress=progress)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:
        console.print(f"[red]curate failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]done:[/] {manifest['curated']} curated, {manifest['rejected']} rejected of {manifest['input']}")
    for name, url in manifest["outputs"].items():
        typer.echo(f"{name}: {url}")


@app.command("make-image-corpus")
def make_image_corpus(
    folder: str = typer.Argument(..., help="Folder (any fsspec URL) to write images/ and manifest.jsonl into."),
) -> None:
    """Write a small image corpus (good, broken and duplicate images) to try `rayllm curate` on."""
    from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus

    corpus = build_corpus(folder)
    typer.echo(
        f"{len(corpus.expected) - 1} images in {corpus.images_url}; manifest (with one missing key): {corpus.manifest_url}"
    )


@app.command()
def validate(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job config (YAML)."),
) -> None:
    """Check a batch config and its input (keys, template fields, sampling) without starting an engine."""
    from prefect_rayllm.rayllm_stages.io.batch_input import check_input, count_rows

    config = _load(BatchJobConfig, config_file)
    try:
        fmt = check_input(config)
        rows = count_rows(config, fmt)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"ok: {config.input} is {fmt} with {rows} rows")


@app.command("make-tiny-model")
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
        console.print(f"[red]error:[/] --task must be one of {', '.join(tasks)}")
        raise typer.Exit(2)
    folder = build_tiny_chat_model(directory, trained=trained, seed=seed, task=tasks[task])
    typer.echo(str(folder))


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".rayllm/demo"), help="Where the model and a copy of the outputs go."),
    rows: int = typer.Option(200, min=1, help="Requests in the sample batch file."),
) -> None:
    """Everything local: an S3 server on loopback, a tiny model, a sample batch file, the flow, the report."""
    from prefect_rayllm.flows.demo import run_demo

    _quiet_ray_logs()
    run_demo(workdir, rows=rows, console=console)


endpoint_app = typer.Typer(help="Operate rolled-out endpoints: status and teardown.", no_args_is_help=True)
app.add_typer(endpoint_app, name="endpoint")


@app.command()
def rollout(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Rollout config (YAML)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="'auto' or ray://host:10001; default local Ray."),
    keep_serving: bool = typer.Option(
        True, "--keep-serving/--exit", help="Local Ray only: keep this process (and the endpoint) up until Ctrl-C."
    ),
) -> None:
    """Roll a model version out to an endpoint: deploy beside the current version, health, smoke,
    evaluation gate, canary steps, then promote, or roll back and keep the old version serving.

    Exit code 0: promoted (or already serving); 1: rolled back or failed; 2: bad config.
    A local Ray lives as long as this process: use `ray start --head` and `--ray-address auto`
    for an endpoint that outlives the command.
    """
    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig

    config = _load(RolloutConfig, config_file, {"ray_address": ray_address} if ray_address else None)
    _quiet_ray_logs()
    start_runtimes(config.ray_address)
    try:
        report = rollout_endpoint(config=config)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            _print_rollout(report)
        console.print(f"[red]rollout failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    _print_rollout(report)
    console.print(f"[green]{report.outcome}:[/] {report.serving} serves {report.url}")
    if config.ray_address is None and keep_serving:
        import time

        console.print("serving from this process's local Ray; Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _print_rollout(report) -> None:
    from rich.table import Table

    table = Table("step", "result", "seconds", "detail")
    for step in report.steps:
        table.add_row(step.step, "passed" if step.passed else "FAILED", f"{step.finished - step.started:.1f}", step.detail)
    console.print(table)


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
        console.print(f"[red]no endpoint named {name!r} on this cluster[/]")
        raise typer.Exit(1)
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
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The rollout config that deployed the version."),
    min_replicas: int = typer.Option(..., "--min", min=0, help="Fewest engine replicas."),
    max_replicas: int = typer.Option(..., "--max", min=1, help="Most engine replicas."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="The cluster serving it; default the config's, else 'auto'."
    ),
) -> None:
    """Change the autoscaling bounds of the running version a rollout config deployed, in place:
    its replicas keep serving, nothing reloads. Exit 1 when that version is not running."""
    from prefect_rayllm.rayllm_stages.llm.engines import cluster_has_gpu
    from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig
    from prefect_rayllm.rayllm_stages.rollout.endpoints import scale_version

    config = _load(RolloutConfig, config_file)
    _connect_quietly(ray_address or config.ray_address or "auto")
    try:
        info = scale_version(config, min_replicas, max_replicas, cluster_has_gpu())
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    typer.echo(f"{info.app}: {min_replicas}..{max_replicas} replicas")


@app.command()
def deploy(
    prefect_file: Path | None = typer.Option(
        None, "--prefect-file", exists=True, dir_okay=False, help="Default: deployments/prefect.yaml of this package."
    ),
    name: list[str] | None = typer.Option(None, "--name", "-n", help="Only this deployment (repeatable); default: all."),
    pool: str | None = typer.Option(None, "--pool", help="Work pool for every deployment (default: the file's)."),
) -> None:
    """Register the deployments (batch, nightly curation, weekly evaluation, rollout and its
    automation) against the configured Prefect API (PREFECT_API_URL: a server or Prefect Cloud).

    Creates the process work pool if missing, then runs `prefect --no-prompt deploy --all
    --prefect-file deployments/prefect.yaml`. Start a worker next: `RAYLLM_CHECKOUT=$PWD prefect
    worker start --pool rayllm`. Exit code 2: no Prefect API configured or a bad file; 1: deploy failed.
    """
    from prefect_rayllm.deployments.project import PREFECT_FILE
    from prefect_rayllm.deployments.project import deploy as deploy_all

    try:
        outcome = deploy_all(prefect_file or PREFECT_FILE, names=name or None, pool=pool)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2 if "no Prefect API" in str(exc) else 1) from None
    typer.echo(outcome.stdout)


@app.command()
def serve(
    names: list[str] | None = typer.Argument(None, help="Deployments to serve (default: all)."),
    prefect_file: Path | None = typer.Option(
        None, "--prefect-file", exists=True, dir_okay=False, help="Default: deployments/prefect.yaml of this package."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many flow runs at once."),
    port: int = typer.Option(4200, "--port", help="Port of the local Prefect server, when one is started."),
) -> None:
    """Run the deployments from this process with their schedules and triggers (`prefect.serve`):
    no work pool, no worker. Without PREFECT_API_URL, a local `prefect server start` (UI on
    http://127.0.0.1:4200) is started first, since Prefect's ephemeral server runs no scheduler.
    Ctrl-C stops serving (and pauses the schedules).
    """
    from prefect_rayllm.deployments.project import PREFECT_FILE
    from prefect_rayllm.deployments.serve import serve as serve_all

    try:
        serve_all(prefect_file or PREFECT_FILE, names or None, limit=limit, port=port)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _connect_quietly(ray_address: str) -> None:
    """Operator commands: join the cluster without its workers' logs on this console."""
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
    ray_runtime.connect(ray_address)


def _load(model, path: Path, overrides: dict | None = None):
    try:
        return load_config(model, path, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
