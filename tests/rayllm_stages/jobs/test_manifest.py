"""`manifest.json`: one `Manifest` type for every job, its counts, throughput and sections."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from prefect_rayllm.rayllm_stages.jobs.manifest import (
    Counts,
    CurationSection,
    Manifest,
    Timings,
    build_counts,
    build_throughput,
    package_versions,
    percentiles,
)
from prefect_rayllm.rayllm_stages.jobs.run_log import PartStats


def test_percentiles_pick_nearest_ranks_and_say_none_without_values():
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p90": 3.0, "p99": 3.0}
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 51.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([0.123456789], points=(50,)) == {"p50": 0.1235}


def test_counts_and_throughput_from_the_run_log_stats():
    stats = PartStats(results=8, errors=2, tokens_in=100, tokens_out=40, latencies=[0.1, 0.2, 0.3])
    stats.error_codes = {"prompt_too_long": 1, "invalid_json": 1}
    counts = build_counts(stats, total=10)
    assert counts == Counts(
        total=10, completed=8, failed=2, error_rate=0.2, errors_by_code={"invalid_json": 1, "prompt_too_long": 1}
    )
    assert list(counts.errors_by_code) == ["invalid_json", "prompt_too_long"]  # sorted by code
    assert build_counts(PartStats(), total=0).error_rate == 0.0
    throughput = build_throughput(stats, wall_s=4.0)
    assert (throughput.rows_per_s, throughput.output_tokens_per_s) == (2.5, 10.0)
    assert (throughput.tokens_in, throughput.tokens_out) == (100, 40) and throughput.latency_s["p50"] == 0.2
    assert build_throughput(stats, wall_s=0.0).rows_per_s == 0.0


def _common(**fields) -> dict:
    return {
        "status": "completed",
        "input": {"url": "in.jsonl"},
        "outputs": {"manifest": "out/manifest.json"},
        "model": {"name": "tiny"},
        "counts": {"total": 2, "completed": 1, "failed": 1, "error_rate": 0.5},
        "timings": {"started_at": 1.0, "finished_at": 2.0, "wall_s": 1.0},
        "throughput": {"rows_per_s": 2.0, "output_tokens_per_s": 0.0, "tokens_in": 0, "tokens_out": 0, "latency_s": {}},
        "attempts": [{"attempt": 1, "rows": 2, "seconds": 1.0}],
        **fields,
    }


def test_one_type_for_every_job_with_its_section():
    batch = Manifest.model_validate(_common(sampling={"max_tokens": 8}, prompt_template_hash="abc", max_error_rate=0.05))
    assert batch.job == "batch" and batch.curation is None and batch.steps is None and batch.engines == []
    chain = Manifest.model_validate(_common(job="chain", steps=[{"name": "a", "rows": 1}]))
    assert chain.steps == [{"name": "a", "rows": 1}]
    curation = Manifest.model_validate(
        _common(
            job="curation",
            curation={
                "rejected_by_stage": {"decode": 1},
                "rejected_by_reason": {"decode: empty file": 1},
                "funnel": [{"stage": "decode", "in": 2, "passed": 1, "rejected": 1, "reasons": {"empty file": 1}}],
                "fetch": {"gets": 2, "retries": 0},
                "computed_now": 2,
                "reused_records": 0,
            },
        )
    )
    assert isinstance(curation.curation, CurationSection) and curation.max_error_rate is None
    assert curation.curation.contact_sheet == {} and curation.curation.repeated_uris_in_source == 0
    for manifest in (batch, chain, curation):
        assert set(manifest.versions) == {"prefect-rayllm", "ray", "vllm", "prefect", "python"}
        assert Manifest.model_validate_json(json.dumps(manifest.model_dump(mode="json"))) == manifest


def test_a_batch_manifest_written_before_the_sections_still_reads():
    """manifest.json of a finished run from before: batch fields at the top level, no curation key."""
    old = _common(
        job="batch",
        sampling={"max_tokens": 8},
        steps=None,
        engines=[],
        prompt_template_hash=None,
        flow_run_id="f",
        max_error_rate=0.05,
        versions={"ray": "2.60.0"},
        counts={"total": 2, "completed": 1, "failed": 1, "error_rate": 0.5, "errors_by_code": {"invalid_json": 1}},
        timings={"started_at": 1.0, "finished_at": 2.0, "wall_s": 1.0, "first_result_s": 0.5},
    )
    manifest = Manifest.model_validate(old)
    assert manifest.max_error_rate == 0.05 and manifest.versions == {"ray": "2.60.0"}
    dumped = manifest.model_dump(mode="json")
    assert {k: dumped[k] for k in old} == old  # the same keys and values, written back


def test_manifest_refuses_unknown_jobs_and_missing_counts():
    with pytest.raises(ValidationError, match="job"):
        Manifest.model_validate(_common(job="rollout"))
    broken = _common()
    del broken["counts"]
    with pytest.raises(ValidationError, match="counts"):
        Manifest.model_validate(broken)


def test_timings_and_versions():
    assert Timings(started_at=1.0, finished_at=2.0, wall_s=0.5).first_result_s is None
    versions = package_versions()
    assert versions["python"] and versions["prefect"]
