"""Curation tasks: run the image pipeline and publish what it kept and rejected."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rayllm_stages.curation import CurationConfig, CurationRun

from .batch import EXECUTION_RETRIES
from .progress import ProgressReporter
from .reporting import artifact_key, emit_job_event


@task(name="curate-images", cache_policy=NO_CACHE, **EXECUTION_RETRIES)
def run_curation(config: CurationConfig) -> dict[str, Any]:
    """Fetch, decode, caption and score, filter and dedup; writes curated/rejected Parquet and a manifest."""
    reporter = ProgressReporter(artifact_key("curation-progress", config.output), "Curation")
    manifest = CurationRun(config).execute(on_progress=reporter)
    get_run_logger().info(
        "%d images: %d curated, %d rejected (%s) in %.1f s",
        manifest["input"], manifest["curated"], manifest["rejected"], manifest["rejected_by_stage"], manifest["seconds"],
    )
    return manifest


@task(name="publish-curation-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_curation_report(config: CurationConfig, manifest: dict[str, Any]) -> None:
    """Per-stage table, a markdown report, and the event `rayllm.curation.completed`."""
    stages = [{"stage": "input", "images": manifest["input"]}, {"stage": "curated", "images": manifest["curated"]}]
    stages += [{"stage": f"rejected at {stage}", "images": count} for stage, count in manifest["rejected_by_stage"].items()]
    create_table_artifact(stages, key=artifact_key("curation-stages", config.output), description="Images per stage")
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in manifest["rejected_by_reason"].items())
    create_markdown_artifact(
        f"# Image curation\n\n{manifest['curated']} of {manifest['input']} images kept "
        f"({manifest['images_per_s']} images/s) with `{manifest['model']['name']}`.\n\n"
        f"| rejected because | images |\n| --- | --- |\n{reasons}\n\n"
        f"Curated: `{manifest['outputs']['curated']}`  \nRejected: `{manifest['outputs']['rejected']}`\n",
        key=artifact_key("curation-report", config.output),
        description="Curation report",
    )
    emit_job_event("curation", "completed", config.output, manifest)
