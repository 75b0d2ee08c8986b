"""The batch job task's cache (tasks.jobs) on the real Prefect server and a local Ray.

Every request of these inputs is refused by the input check (method GET), so a job finishes with
no engine at all: what is under test is when the `batch-job` task is Cached and what it returns,
against the lifecycle's own resume, refuse and overwrite rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefect_rayllm.flows.batch import batch_inference
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused


def _lines(count: int) -> str:
    line = {"method": "GET", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    return "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(count))


def _config(tmp_path: Path, **changes) -> BatchJobConfig:
    fields = {
        "input": str(tmp_path / "in.jsonl"),
        "output": str(tmp_path / "out"),
        "model": {"source": "unused", "engine": "http", "base_url": "http://127.0.0.1:9/v1"},
        "sampling": {"max_tokens": 4},
        "max_error_rate": 1.0,
        **changes,
    }
    return BatchJobConfig.model_validate(fields)


def _run(config: BatchJobConfig, overwrite: bool = False):
    """The flow's manifest and the names of its task runs' final states, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = batch_inference(config=config, overwrite=overwrite, return_state=True)
    manifest = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.created):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return manifest, states


def test_a_rerun_is_cached_and_a_change_is_not(tmp_path, prefect_server, ray_session):
    (tmp_path / "in.jsonl").write_text(_lines(3))
    config = _config(tmp_path)

    first, states = _run(config)
    assert first.counts.total == 3 and first.counts.errors_by_code == {"unsupported_method": 3}
    assert states["batch-job"] == ["Completed"] and "prepare-batch" in states

    again, states = _run(config)
    assert again == first
    assert states["batch-job"] == ["Cached"]
    assert "prepare-batch" not in states and "connect-ray" not in states  # nothing ran under it

    # sizing is not a setting the rows depend on: the same job, answered from the cache
    resized, states = _run(
        _config(tmp_path, model={"source": "unused", "engine": "http", "base_url": "http://127.0.0.1:9/v1", "batch_size": 7})
    )
    assert resized == first and states["batch-job"] == ["Cached"]

    # another setting, or another input: the lifecycle decides (it refuses), never the cache
    with pytest.raises(ResumeRefused, match="sampling"):
        batch_inference(config=_config(tmp_path, sampling={"max_tokens": 5}))
    (tmp_path / "in.jsonl").write_text(_lines(4))
    with pytest.raises(ResumeRefused, match="the input file changed"):
        batch_inference(config=config)

    # overwrite runs the job again and its manifest is the one a plain rerun then gets
    rerun, states = _run(config, overwrite=True)
    assert states["batch-job"] == ["Completed"] and rerun.counts.total == 4
    cached, states = _run(config)
    assert states["batch-job"] == ["Cached"] and cached == rerun


def test_a_manifest_rewritten_outside_the_cache_is_not_answered_from_it(tmp_path, prefect_server, ray_session):
    (tmp_path / "in.jsonl").write_text(_lines(2))
    config = _config(tmp_path)
    first, _ = _run(config)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    on_disk["flow_run_id"] = "written-elsewhere"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(on_disk))

    manifest, states = _run(config)
    assert manifest.flow_run_id == "written-elsewhere"
    assert states["batch-job"] == ["Cached", "Completed"]  # the stale hit, then the job itself
    again, states = _run(config)
    assert again == manifest and states["batch-job"] == ["Cached"]


def test_a_completed_chain_rerun_is_cached(tmp_path, prefect_server, ray_session):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from prefect_rayllm.flows.chain import run_chain
    from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"cid": "", "colour": c}) + "\n" for c in ("red", "teal")))
    step = {"model": {"source": "unused", "engine": "http", "base_url": "http://127.0.0.1:9/v1"}, "sampling": {"max_tokens": 4}}
    config = ChainJobConfig.model_validate(
        {
            "input": str(tmp_path / "t.jsonl"),
            "output": str(tmp_path / "chain"),
            "id_column": "cid",  # every id is empty: each row is an input error, no engine runs
            "steps": [{"name": "ask", "prompt": {"user": "{{ colour }}"}, "output_column": "answer", **step}],
            "max_error_rate": 1.0,
        }
    )
    names = []
    for _ in range(2):
        state = run_chain(config=config, return_state=True)
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        names.append({run.name.rsplit("-", 1)[0]: run.state.name for run in runs}["chain-job"])
        assert state.result().counts.errors_by_code == {"missing_id": 2}
    assert names == ["Completed", "Cached"]
