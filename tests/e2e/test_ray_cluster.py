"""`ray_address` sends the same job to an existing Ray cluster (here a head node started on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, openai_line

from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        [
            sys.executable,
            "-m",
            "prefect_rayllm.flows.cli",
            "--log-format",
            "text",  # Prefect's log lines: the connect-ray line names the cluster
            "batch",
            str(config),
            "--ray-address",
            address,
            "--no-progress",
        ],
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
@pytest.mark.nightly  # 9 to 10 minutes; rollout under load on the session's Ray runs in CI (test_rollout.py)
def test_readme_cluster_rollout_under_client_load(tmp_path, ray_head, tiny_models):
    """The README's cluster rollout, as a new user runs it: `ray start --head`, then `rayllm rollout
    examples/rollout-cpu.yaml --ray-address ...` (no PREFECT_API_URL: each command starts its own
    temporary Prefect server), with a bounded client sending chat requests to the stable URL from
    the first promotion to the end. The untrained model is rolled back by the smoke test (the reason
    in the step table, as plain text); a trained copy is promoted through every canary step; no
    client request fails. Then the endpoint outlives the CLI, and operators find, scale and remove it."""
    from prefect_rayllm.rayllm_stages.testing.client_load import ClientLoad, summarize

    address, head_dir = ray_head
    example = yaml.safe_load((REPO / "examples" / "rollout-cpu.yaml").read_text())
    http_port = _free_port()

    def write_config(name: str, model: Path) -> Path:
        config = json.loads(json.dumps(example))
        config["candidate"]["source"] = str(model)
        config["candidate"]["concurrency"] = 1  # one engine replica per version on this 2-core machine
        config["http"]["port"] = http_port
        config["evaluation"]["dataset"]["path"] = str(REPO / "examples" / "data" / "colours-eval.jsonl")
        config["evaluation"]["output"] = str(tmp_path / "evals")
        for prompt in config["smoke"]:
            prompt["max_latency_s"] = 60  # a loaded 2-core machine
        for step in config["canary"]:
            step["hold_s"] = 15  # the example holds 30 s: half keeps the test lean
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    first = write_config("first", tiny_models["good"])
    untrained = write_config("untrained", tiny_models["bad"])
    trained_copy = write_config("trained-copy", shutil.copytree(tiny_models["good"], tmp_path / "tiny-good-v2"))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAYLLM_OWNERS")}
    env.update(RAYLLM_RAY_LOGS="0", COLUMNS="250")  # one table row per line

    def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "prefect_rayllm.flows.cli", *args, "--ray-address", address],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        name = "-".join(Path(a).stem if "/" in a else a for a in args)
        (tmp_path / f"{name}.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)  # to read after a failure
        return done

    def table_row(stderr: str, step: str) -> str:
        return next((line for line in stderr.splitlines() if line.startswith(f"│ {step} ")), "")

    timings = {}
    started = time.monotonic()
    rolled = cli("rollout", str(first))
    timings["first"] = time.monotonic() - started
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "promoted:" in rolled.stderr, rolled.stderr
    stable = f"http://127.0.0.1:{http_port}/colours/v1"

    load = ClientLoad(stable, "colours", "Is red warm or cool?", concurrency=2, max_tokens=4, timeout_s=120)
    with load:
        started = time.monotonic()
        bad = cli("rollout", str(untrained))
        timings["untrained"] = time.monotonic() - started
        started = time.monotonic()
        good = cli("rollout", str(trained_copy))
        timings["trained copy"] = time.monotonic() - started
        time.sleep(2)
    served = summarize(load.samples)

    # The untrained model: rolled back by the smoke test, for the real reason, as plain text.
    assert bad.returncode == 1, bad.stdout + bad.stderr
    smoke = table_row(bad.stderr, "smoke")
    assert "FAILED" in smoke and "reply does not contain 'warm'" in smoke, bad.stderr
    assert "HTTP 404" not in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
    assert "\x1b" not in bad.stderr, bad.stderr
    assert "rolled back" in bad.stderr and "inconclusive" not in bad.stderr
    # The console is a progress and a summary: no JSON log lines, no HTTP request lines.
    for output in (rolled.stderr, bad.stderr, good.stderr):
        assert not [line for line in output.splitlines() if line.lstrip().startswith("{")], output
        assert "HTTP Request" not in output

    # The trained copy: every canary step passed, then promoted.
    assert good.returncode == 0, good.stdout + good.stderr
    for step in ("deploy", "health", "smoke", "evaluation gate", "canary 10%", "canary 50%", "canary 100%", "promote"):
        assert "passed" in table_row(good.stderr, step), (step, good.stderr)
    assert "promoted:" in good.stderr

    # Zero failed client requests, the whole time; the new version answers at the end.
    assert served["failures"] == 0, [s.error for s in load.samples if not s.ok][:5]
    assert served["requests"] > 100 and {s.text for s in load.samples} == {"warm"}
    assert load.samples[-1].version == json.loads(_status(cli))["primary"] != load.samples[0].version
    print(f"\ncluster rollout under load: {served}; seconds per rollout { ({k: round(v) for k, v in timings.items()}) }")
    print(table_row(bad.stderr, "smoke"))

    # No Ray worker started a Prefect server of its own (Prefect says so when it starts one).
    worker_logs = list(Path(head_dir).glob("session_*/logs/worker-*"))
    assert worker_logs and not [p.name for p in worker_logs if "Starting temporary server" in p.read_text(errors="replace")]

    # The CLI has exited; the endpoint keeps serving from the cluster.
    body = json.dumps({"model": "colours", "messages": [{"role": "user", "content": "Is red warm or cool?"}], "max_tokens": 4})
    request = urllib.request.Request(
        f"{stable}/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert "warm" in json.loads(response.read())["choices"][0]["message"]["content"]

    described = json.loads(_status(cli))
    assert list(described["weights"].values()) == [100] and described["primary"] in described["weights"]

    scaled = cli("endpoint", "scale", str(trained_copy), "--min", "1", "--max", "2", timeout=300)
    assert scaled.returncode == 0 and "1..2 replicas" in scaled.stdout, scaled.stdout + scaled.stderr

    removed = cli("endpoint", "teardown", "colours", timeout=120)
    assert removed.returncode == 0 and "colours-" in removed.stdout, removed.stdout + removed.stderr
    gone = cli("endpoint", "status", "colours", timeout=120)
    assert gone.returncode == 1, gone.stdout + gone.stderr


def _status(cli) -> str:
    status = cli("endpoint", "status", "colours", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    return status.stdout[status.stdout.index("{") :]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root (mount namespace)")
def test_a_node_that_cannot_see_the_local_input_stops_the_run_before_any_engine(tmp_path, ray_head, prefect_server):
    """Workers read the input where they run. A second node joins the head in a mount namespace of
    its own, where the input's folder is an empty tmpfs (injected fault: a node without the shared
    mount); the run stops before any engine starts, naming the input and the node."""
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    address, _ = ray_head
    node_dir = tempfile.mkdtemp(prefix="raynode-")
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("\n".join(openai_line(f"c{i}", q) for i, (q, _) in enumerate(TOY_TASK)) + "\n")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    join = (
        f"mount -t tmpfs none {data} && exec {ray} start --address={address} --num-cpus=2 "
        f"--node-ip-address=127.0.0.1 --temp-dir={node_dir} --disable-usage-stats"
    )
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", join],
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=120,
    )
    try:
        _run_and_expect_node_named(tmp_path, data, address, prefect_server)
    finally:
        for proc in ray_runtime.session_processes(node_dir):
            with contextlib.suppress(Exception):
                proc.kill()


def _run_and_expect_node_named(tmp_path: Path, data: Path, address: str, prefect_server: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump({"input": str(data / "in.jsonl"), "output": str(tmp_path / "out"), "model": {"source": "./unused"}})
    )
    run = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config), "--ray-address", address, "--no-progress"],
        cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert re.search(r"input: \S*in\.jsonl does not exist on Ray node \S+ \(\w+\); use object storage", output), output
