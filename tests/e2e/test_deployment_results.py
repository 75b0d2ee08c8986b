"""`run_deployment` of the batch deployment returns the manifest; a second identical run is Cached.

prefect.yaml's batch deployment (renamed, on the tiny model with CPU vLLM and the test's input) is
served by `rayllm serve` against the session's real Prefect server, as tests/e2e/test_deployments.py
serves its schedule test; the runs are started with `prefect.deployments.run_deployment`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import openai_line

from prefect_rayllm.deployments.project import PREFECT_FILE, load_project

BIN = Path(sys.executable).parent
NAME = "batch-results"


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.created):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


@pytest.mark.slow
def test_run_deployment_returns_the_manifest_and_a_second_identical_run_is_cached(prefect_server, tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from prefect_rayllm.deployments.server import stop_process_group
    from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
    from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

    lines = [openai_line(f"q{i}", question) for i, (question, _) in enumerate(TOY_TASK)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    project = load_project(PREFECT_FILE)
    (batch,) = [d for d in project["deployments"] if d["name"] == "batch"]
    batch["name"] = NAME
    batch["parameters"]["config"].update(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out"),
        model={"source": str(tiny_models["good"]), "engine": "vllm", "engine_kwargs": {"max_model_len": 256}, "batch_size": 4},
        sampling={"temperature": 0.0, "max_tokens": 8},
        max_error_rate=0.0,
    )
    project["deployments"] = [batch]
    variant = tmp_path / "prefect.yaml"
    variant.write_text(yaml.safe_dump(project, sort_keys=False))

    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    serve = _spawn([str(BIN / "rayllm"), "serve", "--prefect-file", str(variant), "--limit", "1"], env, log, tmp_path)
    timings: dict[str, float] = {}
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 180
            while True:
                assert serve.poll() is None, log.read_text()[-4000:]
                try:
                    client.read_deployment_by_name(f"batch-inference/{NAME}")
                    break
                except Exception:
                    assert time.time() < deadline, log.read_text()[-4000:]
                    time.sleep(2)

        started = time.time()
        first = run_deployment(f"batch-inference/{NAME}", timeout=900)
        timings["first run"] = time.time() - started
        assert first.state.is_completed(), f"{first.state}\n{log.read_text()[-4000:]}"
        manifest = first.state.result()
        assert isinstance(manifest, Manifest)
        assert manifest.flow_run_id == str(first.id)
        assert manifest.counts.total == len(TOY_TASK) and manifest.counts.failed == 0
        assert manifest.outputs["results"] == str(tmp_path / "out" / "results.jsonl")
        states = _task_states(first.id)
        assert states["batch-job"] == ["Completed"] and states["run-batch"] == ["Completed"], states

        started = time.time()
        second = run_deployment(f"batch-inference/{NAME}", timeout=900)
        timings["second run"] = time.time() - started
        assert second.state.is_completed(), f"{second.state}\n{log.read_text()[-4000:]}"
        assert second.state.result() == manifest  # the first run's manifest, its flow run id included
        states = _task_states(second.id)
        assert states["batch-job"] == ["Cached"], states
        assert "run-batch" not in states and "connect-ray" not in states, states  # no Ray, no engine
    finally:
        if serve.poll() is None:
            stop_process_group(serve, grace_s=30)
        print(f"\ntimings (s): { {k: round(v, 1) for k, v in timings.items()} }; serve log: {log}")


def _spawn(command: list[str], env: dict, log: Path, cwd: Path):
    import subprocess

    return subprocess.Popen(command, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
