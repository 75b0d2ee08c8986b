"""`ray_address` sends the same job to an existing Ray cluster (here a head node started on loopback)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import yaml
from conftest import REPO, openai_line

from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate Ray head node; stopped by killing its own session's processes only."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-")
    port = _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=8",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=120,
    )
    yield f"127.0.0.1:{port}", temp_dir
    for proc in ray_runtime.session_processes(temp_dir):
        for child in [proc, *proc.children(recursive=True)]:
            try:
                child.kill()
            except Exception:
                pass


@pytest.mark.slow
def test_batch_runs_on_a_ray_cluster_through_ray_address(tmp_path, ray_head, tiny_models, prefect_server):
    address, temp_dir = ray_head
    (tmp_path / "in.jsonl").write_text("\n".join(openai_line(f"c{i}", q) for i, (q, _) in enumerate(TOY_TASK)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "in.jsonl"),
                "output": str(tmp_path / "out"),
                "model": {"source": str(tiny_models["good"]), "engine_kwargs": {"max_model_len": 256}},
                "sampling": {"max_tokens": 8},
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config), "--ray-address", address, "--no-progress"],
        cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": prefect_server, "RAYLLM_RAY_LOGS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    answers = {
        json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["choices"][0]["message"]["content"]
        for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    }
    assert answers == {f"c{i}": a for i, (_, a) in enumerate(TOY_TASK)}
    # The job ran on the cluster we named, not on a new local Ray.
    port = address.rsplit(":", 1)[1]
    assert re.search(rf"Ray connected at \S+:{port} ", run.stdout + run.stderr), run.stdout + run.stderr


@pytest.mark.slow
def test_rollout_runs_on_a_ray_cluster_through_ray_address(tmp_path, ray_head, tiny_models, prefect_server):
    """The example rollout config, pointed at another cluster: the endpoint outlives the CLI process
    and operators find and remove it there."""
    address, _ = ray_head
    config = yaml.safe_load((REPO / "examples" / "rollout-cpu.yaml").read_text())
    http_port = _free_port()
    config["candidate"]["source"] = str(tiny_models["good"])
    config["candidate"]["concurrency"] = 1
    config["http"]["port"] = http_port
    config["evaluation"]["dataset"]["path"] = str(REPO / "examples" / "data" / "colours-eval.jsonl")
    config["evaluation"]["output"] = str(tmp_path / "evals")
    for prompt in config["smoke"]:
        prompt["max_latency_s"] = 60  # a loaded 2-core machine
    config_path = tmp_path / "rollout.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAYLLM_RAY_LOGS": "0"}

    def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "prefect_rayllm.flows.cli", *args, "--ray-address", address],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    rolled = cli("rollout", str(config_path))
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "promoted:" in rolled.stderr, rolled.stderr

    # The CLI has exited; the endpoint keeps serving from the cluster.
    body = json.dumps({"model": "colours", "messages": [{"role": "user", "content": "Is red warm or cool?"}], "max_tokens": 4})
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/colours/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert "warm" in json.loads(response.read())["choices"][0]["message"]["content"]

    status = cli("endpoint", "status", "colours", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    described = json.loads(status.stdout[status.stdout.index("{") :])
    assert list(described["weights"].values()) == [100] and described["primary"] in described["weights"]

    scaled = cli("endpoint", "scale", str(config_path), "--min", "1", "--max", "2", timeout=300)
    assert scaled.returncode == 0 and "1..2 replicas" in scaled.stdout, scaled.stdout + scaled.stderr

    removed = cli("endpoint", "teardown", "colours", timeout=120)
    assert removed.returncode == 0 and "colours-" in removed.stdout, removed.stdout + removed.stderr
    gone = cli("endpoint", "status", "colours", timeout=120)
    assert gone.returncode == 1, gone.stdout + gone.stderr
