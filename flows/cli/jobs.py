"""`rayllm batch|chain|evaluate|curate|rollout CONFIG.yaml`: run one job in this process.

Each command checks its config and its input first (`load_checked`: no Ray, no Prefect server yet),
then starts Prefect's server and Ray side by side and runs the job's flow with a progress bar.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from prefect_rayllm.flows.cli.app import JOBS, config_argument, console, load_checked
from prefect_rayllm.flows.local import quiet_ray_logs, run_with_progress, start_runtimes
from prefect_rayllm.rayllm_stages.config.base import ConfigError

OVERWRITE_HELP = "Start over when the output holds a run with other settings."
RAY_ADDRESS_HELP = "'auto' or ray://host:10001; default local Ray."

commands = typer.Typer()


def _overwrite() -> Any:
    return typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


def _input() -> Any:
    return typer.Option(None, "--input", help="Override the config's input URL.")


def _output() -> Any:
    return typer.Option(None, "--output", help="Override the config's output URL.")


def _ray_address() -> Any:
    return typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP)


def _progress() -> Any:
    return typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


@commands.command(rich_help_panel=JOBS)
def batch(
    config_file: Path = config_argument("Job config"),
    overwrite: bool = _overwrite(),
    input: str | None = _input(),
    output: str | None = _output(),
    ray_address: str | None = _ray_address(),
    progress: bool = _progress(),
) -> None:
    """Run batch inference on an OpenAI Batch JSONL file or a JSONL/Parquet table.

    Writes results.jsonl, errors.jsonl and manifest.json to the output location; a rerun on the
    same output resumes. Exit code 2: bad config or input; 1: the run failed.
    """
    config = load_checked("batch", config_file, {"input": input, "output": output, "ray_address": ray_address}, overwrite)
    from prefect_rayllm.flows.batch import batch_inference

    quiet_ray_logs()
    _print_manifest(run_with_progress(batch_inference, "batch", config, overwrite, console, show_progress=progress))


@commands.command(rich_help_panel=JOBS)
def chain(
    config_file: Path = config_argument("Chain config"),
    overwrite: bool = _overwrite(),
    input: str | None = _input(),
    output: str | None = _output(),
    ray_address: str | None = _ray_address(),
    progress: bool = _progress(),
) -> None:
    """Run a multi-model chain over a JSONL/Parquet table.

    Each step has its own model and prompt, and reads the input columns and earlier steps'
    outputs. All steps run at once.

    Writes results.jsonl (input columns + every step's output), errors.jsonl (with the failed step)
    and manifest.json; a rerun on the same output resumes, per step. Exit code 2: bad config or
    input; 1: the run failed.
    """
    config = load_checked("chain", config_file, {"input": input, "output": output, "ray_address": ray_address}, overwrite)
    from prefect_rayllm.flows.chain import run_chain

    quiet_ray_logs()
    _print_manifest(run_with_progress(run_chain, "chain", config, overwrite, console, show_progress=progress))


def _print_manifest(manifest: Any) -> None:
    counts = manifest.counts
    console.print(
        f"[green]done:[/] {counts.completed} completed, {counts.failed} failed of {counts.total}; "
        f"{manifest.throughput.rows_per_s} rows/s"
    )
    for name, url in manifest.outputs.items():
        typer.echo(f"{name}: {url}")


@commands.command(rich_help_panel=JOBS)
def evaluate(
    config_file: Path = config_argument("Evaluation config"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over when the output holds answers made with other settings."
    ),
    output: str | None = _output(),
    ray_address: str | None = _ray_address(),
    progress: bool = _progress(),
) -> None:
    """Evaluate models or endpoints on a dataset, against a baseline and a gate.

    Metrics with intervals, an optional LLM judge, deltas against a baseline, and a gate.

    Writes scores.jsonl, metrics.json, report.md and plots/ to the output location. Exit code 0:
    the gate passed; 1: the gate (or the run) failed; 2: bad config or dataset.
    """
    config = load_checked("evaluation", config_file, {"output": output, "ray_address": ray_address}, overwrite)
    from prefect_rayllm.flows.evaluation import evaluate as evaluate_flow

    quiet_ray_logs()
    try:
        result = run_with_progress(evaluate_flow, "evaluate", config, overwrite, console, show_progress=progress)
    except ConfigError:
        raise
    except Exception:
        _print_verdicts(config)  # the gate's table, when it got that far
        raise
    _print_verdicts(config)
    console.print(f"[green]{'passed' if result.passed else 'gate failed (fail_flow is off)'}[/]")
    for name, url in result.outputs.items():
        if not name.startswith("plot:"):
            typer.echo(f"{name}: {url}")


def _print_verdicts(config: Any) -> None:
    """The per-target summary and gate of the run's metrics.json, if it got that far."""
    from prefect_rayllm.rayllm_stages.config.base import with_credentials
    from prefect_rayllm.rayllm_stages.evaluation.run import EvaluationResult
    from prefect_rayllm.rayllm_stages.io.storage import Location

    metrics = Location(config.output, with_credentials(config).storage_options).child("metrics.json")
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


@commands.command(rich_help_panel=JOBS)
def curate(
    config_file: Path = config_argument("Curation config"),
    output: str | None = _output(),
    ray_address: str | None = _ray_address(),
    progress: bool = _progress(),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over when the output holds a run with other images or settings."
    ),
) -> None:
    """Curate images from an S3 prefix or a manifest: fetch, decode, VLM caption and scores, rules, dedup.

    Writes curated.parquet, rejected.parquet (uri, stage, reason), contact_sheet.png and
    manifest.json. A rerun on the same output resumes. Exit code 2: bad config or source; 1: the
    run failed.
    """
    config = load_checked("curation", config_file, {"output": output, "ray_address": ray_address}, overwrite)
    from prefect_rayllm.flows.curation import curate_images

    quiet_ray_logs()
    manifest = run_with_progress(curate_images, "curate", config, overwrite, console, show_progress=progress)
    counts = manifest.counts
    console.print(f"[green]done:[/] {counts.completed} curated, {counts.failed} rejected of {counts.total}")
    for name, url in manifest.outputs.items():
        typer.echo(f"{name}: {url}")


@commands.command(rich_help_panel=JOBS)
def rollout(
    config_file: Path = config_argument("Rollout config"),
    ray_address: str | None = _ray_address(),
    keep_serving: bool = typer.Option(
        True, "--keep-serving/--exit", help="Local Ray only: keep this process (and the endpoint) up until Ctrl-C."
    ),
) -> None:
    """Roll a model version out to an endpoint; promote it, or roll it back.

    Deploy beside the current version, health, smoke, evaluation gate, canary steps, then
    promote, or roll back and keep the old version serving.

    Exit code 0: promoted (or already serving); 1: rolled back (a check failed), inconclusive
    (a check could not be measured) or failed; 2: bad config.
    A local Ray lives as long as this process: use `ray start --head` and `--ray-address auto`
    for an endpoint that outlives the command.
    """
    config = load_checked("rollout", config_file, {"ray_address": ray_address})
    from prefect_rayllm.flows.console import print_step
    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.tasks.progress import step_listener

    quiet_ray_logs()
    start_runtimes(config.ray_address)
    try:
        with step_listener(print_step(console)):
            report = rollout_endpoint(config=config)
    except ConfigError:
        raise
    except Exception as exc:
        if getattr(exc, "report", None) is not None:
            _print_rollout(exc.report)  # type: ignore[attr-defined]
        raise
    _print_rollout(report)
    console.print(f"[green]{report.outcome}:[/] {report.serving} serves {report.url}")
    if config.ray_address is None and keep_serving:
        console.print("serving from this process's local Ray; Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _print_rollout(report: Any) -> None:
    table = Table("step", "result", "seconds", "detail")
    for step in report.steps:
        table.add_row(step.step, "passed" if step.passed else "FAILED", f"{step.finished - step.started:.1f}", step.detail)
    console.print(table)
