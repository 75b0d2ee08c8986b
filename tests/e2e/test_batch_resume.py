"""A run killed with SIGKILL mid-way, then rerun, ends with the same results as an uninterrupted
run: no duplicates, finished rows not recomputed, and the dead run's Ray cluster reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, openai_line

from prefect_rayllm.flows.batch import batch_inference
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

ROWS = 400


def _cli(config_path: Path, api_url: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config_path), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _answers(path: Path) -> dict[str, str]:
    answers = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in answers, f"duplicate {record['custom_id']}"
        answers[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
    return answers


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, prefect_server, ray_session, tiny_models):
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(openai_line(f"r{i}", TOY_TASK[i % 12][0], max_tokens=48) for i in range(ROWS)) + "\n")
    # 48 tokens a row (min_tokens): seconds of engine work after the first part, so the kill lands mid-run.
    common = dict(
        input=str(source),
        model={"source": str(tiny_models["bad"]), "engine_kwargs": {"max_model_len": 256}, "batch_size": 8},
        sampling={"temperature": 0.0, "max_tokens": 48, "min_tokens": 48},
        commit_every_rows=20,
    )
    reference = batch_inference(config=BatchJobConfig(output=str(tmp_path / "reference"), **common))
    assert reference.counts.completed == ROWS

    output = tmp_path / "killed"
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({**common, "output": str(output)}))
    first = _cli(config_path, prefect_server)
    parts = output / "_rayllm" / "parts"
    deadline = time.time() + 600
    while not list(parts.glob("*.part")):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no part committed in 600 s"
        time.sleep(0.05)
    registry = ray_runtime.REGISTRY / f"{first.pid}.json"
    session_dir = json.loads(registry.read_text())["session_dir"]
    left_behind = _descendants(first.pid)  # GCS, raylet, stage actors, the vLLM engine process
    assert left_behind, "the driver should have started a local Ray"
    os.kill(first.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
    first.wait()
    done_before = sum(len(json.loads(p.open().readline()[len("#rayllm-part ") :])["indexes"]) for p in parts.glob("*.part"))
    assert 0 < done_before < ROWS

    second = _cli(config_path, prefect_server)
    log, _ = second.communicate(timeout=900)
    assert second.returncode == 0, log

    assert not ray_runtime.session_processes(session_dir), "the dead driver's Ray cluster is still running"
    survivors = [p for p in left_behind if _still_running(p)]
    assert not survivors, f"processes of the killed run still alive: {survivors}"
    assert _answers(output / "results.jsonl") == _answers(tmp_path / "reference" / "results.jsonl")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["counts"]["completed"] == ROWS
    rows_per_attempt = [a["rows"] for a in manifest["attempts"]]
    assert rows_per_attempt[0] >= done_before and sum(rows_per_attempt) == ROWS, rows_per_attempt
    assert len(rows_per_attempt) == 2
