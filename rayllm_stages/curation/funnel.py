"""What happened to the images, counted: the funnel per stage with reasons, and the fetch retries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from prefect_rayllm.rayllm_stages.curation.records import STAGES


def reason_kind(stage: str, reason: str) -> str:
    """A short key per kind of reason, for counts (the full reason stays in rejected.parquet)."""
    import re

    text = reason
    if stage in ("fetch", "decode") and ": " in text:
        text = text.split(": ", 1)[1]  # drop the leading "<uri>: "
    if stage == "dedup":
        text = text.split(" of ", 1)[0]
    elif stage == "caption":
        text = text.removeprefix("step caption: ")
    text = (text.split(":")[0] if stage != "filter" else text).split(" (")[0]
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return f"{stage}: {text[:60]}"


def funnel(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: images in, passed, rejected, and rejected by kind of reason."""
    rows, remaining = [], len(records)
    stages = list(STAGES) + sorted({r["stage"] for r in records if r["stage"] and r["stage"] not in STAGES})
    for stage in stages:
        reasons = Counter(reason_kind(stage, r["reason"]).split(": ", 1)[1] for r in records if r["stage"] == stage)
        rejected = sum(reasons.values())
        rows.append(
            {
                "stage": stage,
                "in": remaining,
                "passed": remaining - rejected,
                "rejected": rejected,
                "reasons": dict(reasons.most_common()),
            }
        )
        remaining -= rejected
    return rows


def fetch_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """GETs made, images that needed retries, and how many of those were read in the end."""
    retried = [r for r in records if int(r.get("fetch_attempts") or 0) > 1]
    return {
        "gets": sum(int(r.get("fetch_attempts") or 0) for r in records),
        "retries": sum(int(r["fetch_attempts"]) - 1 for r in retried),
        "retried_images": len(retried),
        "recovered_images": sum(1 for r in retried if r["stage"] != "fetch"),
        "gave_up_images": sum(1 for r in records if r["stage"] == "fetch" and "gave up after" in r["reason"]),
    }
