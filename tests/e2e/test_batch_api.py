"""End to end: the official `openai` client against `rayllm api` on loopback (a real process serving
the batch deployment, the session's real Prefect server, real Ray and the real CPU vLLM engine).

One API process at a time; the batch survives SIGKILL of the process that runs it, and its output
equals a direct `rayllm batch` of the same file, line for line (greedy decoding)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
import yaml
from conftest import openai_line
from typer.testing import CliRunner

from prefect_rayllm.deployments.server import free_port
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK
from prefect_rayllm.tasks.reporting import artifact_key

BIN = Path(sys.executable).parent
KEY = f"sk-rayllm-e2e-{uuid.uuid4().hex}"
MODEL = {"engine_kwargs": {"max_model_len": 256, "max_num_seqs": 2}, "batch_size": 4}  # a slow engine: a window to kill in
SAMPLING = {"temperature": 0.0, "max_tokens": 8}
COMMIT_EVERY_ROWS = 8
ROWS = 160


class ApiProcess:
    """`rayllm api` as a subprocess on one loopback port; `restart(kill=True)` is a SIGKILL and a new process."""

    def __init__(self, config: Path, env: dict[str, str], logs: Path):
        self.config, self.env, self.logs = config, env, logs
        settings = yaml.safe_load(config.read_text())
        self.storage, self.model_source = Path(settings["storage"]), settings["models"]["tiny"]["source"]
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self, number: int | None = None) -> Path:
        return self.logs / f"api-{number or self.starts}.log"

    def start(self, timeout_s: float = 600) -> None:
        self.starts += 1
        command = [str(BIN / "rayllm"), "api", str(self.config), "--port", str(self.port)]
        log = open(self.log(), "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while True:
            assert self.process.poll() is None, f"rayllm api exited\n{self.tail()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                assert time.time() < deadline, f"rayllm api did not answer in {timeout_s} s\n{self.tail()}"
                time.sleep(1)

    def kill(self) -> None:
        """SIGKILL, as a crash: only the process; its watchdog stops what it started."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        from prefect_rayllm.deployments.server import stop_process_group

        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process, grace_s=30)

    def tail(self, chars: int = 6000) -> str:
        return "\n".join(self.log(n).read_text(errors="replace")[-chars:] for n in range(1, self.starts + 1))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=KEY, max_retries=2, timeout=120)


@pytest.fixture(scope="module")
def batch_api(tmp_path_factory, prefect_server, tiny_models):
    root = tmp_path_factory.mktemp("batch-api")
    config = root / "api.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": str(root / "store"),
                "models": {"tiny": {"source": str(tiny_models["good"]), **MODEL}},
                "sampling": SAMPLING,
                "commit_every_rows": COMMIT_EVERY_ROWS,
                "sweep_every_s": 2,
            }
        )
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "RAYLLM_API_KEY": KEY,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "RAYLLM_RAY_LOGS": "0",
    }
    api = ApiProcess(config, env, root)
    try:
        yield api
    finally:
        api.stop()
        print(f"\nrayllm api logs: {root}/api-*.log")


def _requests_file(path: Path) -> Path:
    lines = [openai_line(f"q{i}", TOY_TASK[i % len(TOY_TASK)][0], temperature=0) for i in range(ROWS)]
    lines.insert(ROWS // 2, openai_line("too-long", "word " * 400))  # fails in the engine: the error file
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait(client: openai.OpenAI, batch_id: str, until, timeout_s: float, api: ApiProcess, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert batch.status not in ("failed", "expired", "cancelled", "completed"), f"{batch}\n{api.tail()}"
        assert time.time() < deadline, f"still {batch.status} after {timeout_s} s: {batch.request_counts}\n{api.tail()}"
        time.sleep(poll_s)


def _by_custom_id(text: str) -> dict[str, dict]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(by_id) == len(records), "a custom_id appears twice"
    return by_id


def _comparable(record: dict) -> dict:
    """An output line without what names the run (ids derived from its output folder, creation time)."""
    response = record["response"]
    body = dict(response["body"]) if response else None
    if body is not None:
        body.pop("id", None)
        body.pop("created", None)
    return {
        "custom_id": record["custom_id"],
        "status_code": response and response["status_code"],
        "body": body,
        "error": record["error"],
    }


@pytest.mark.slow
def test_openai_client_batch_end_to_end_through_a_restart(batch_api, tmp_path, request):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    timings: dict[str, float] = {}
    started = time.time()
    client = batch_api.client()
    source = _requests_file(tmp_path / "requests.jsonl")

    # A malformed file fails at once, each bad line named; no run is created for it.
    bad_lines = [openai_line("a", "Hi"), "{not json", openai_line("b", "Hi", model="gpt-4o")]
    bad = client.files.create(file=("bad.jsonl", ("\n".join(bad_lines) + "\n").encode()), purpose="batch")
    refused = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.status == "failed" and refused.failed_at
    assert [(e.line, e.code) for e in refused.errors.data] == [(2, "invalid_json"), (3, "model_not_found")]
    assert refused.errors.data[0].message.startswith("line 2: not valid JSON")
    assert "known models: tiny" in refused.errors.data[1].message

    uploaded = client.files.create(file=source.open("rb"), purpose="batch")
    assert uploaded.bytes == source.stat().st_size and client.files.content(uploaded.id).content == source.read_bytes()
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"suite": "e2e"}
    )
    assert batch.status in ("validating", "in_progress") and batch.model == "tiny"
    assert batch.request_counts.total == ROWS + 1 and batch.metadata == {"suite": "e2e"}

    # The batch is a flow run of the batch deployment, named and tagged by the batch id.
    with get_client(sync_client=True) as prefect:
        (run,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch.id])))
        deployment = prefect.read_deployment(run.deployment_id)
    assert (run.name, deployment.name) == (batch.id, "batch") and batch.id in run.tags
    assert KEY not in json.dumps(run.parameters)

    # Kill the API process (which runs the batch) mid-batch, once some rows are committed.
    before = _wait(client, batch.id, lambda b: b.request_counts.completed > 0 or b.status == "completed", 2400, batch_api, 0.2)
    timings["create -> first committed rows"] = time.time() - started
    assert before.status == "in_progress", f"the batch finished before the kill: {before.request_counts}"
    batch_api.kill()
    killed_at = time.time()
    batch_api.start()
    client = batch_api.client()
    timings["restart"] = time.time() - killed_at
    after = client.batches.retrieve(batch.id)  # the new process knows it, and lost none of its rows
    assert after.id == batch.id and after.status in ("in_progress", "validating", "finalizing", "completed")
    assert after.request_counts.completed + after.request_counts.failed >= before.request_counts.completed
    assert [b.id for b in client.batches.list()] == [batch.id, refused.id]

    done = _wait(client, batch.id, lambda b: b.status == "completed", 2400, batch_api, 1.0)
    timings["restart -> completed"] = time.time() - killed_at
    assert done.request_counts.model_dump() == {"total": ROWS + 1, "completed": ROWS, "failed": 1}
    assert done.completed_at and done.in_progress_at and done.finalizing_at and done.usage.output_tokens > 0
    manifest = json.loads((batch_api.storage / "batches" / batch.id / "manifest.json").read_text())
    assert len(manifest["attempts"]) >= 2, manifest["attempts"]  # resumed: the committed rows were kept
    assert manifest["attempts"][-1]["rows"] < ROWS + 1

    output = client.files.content(done.output_file_id).text
    errors = client.files.content(done.error_file_id).text
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    # The same file through `rayllm batch` (in this process: the session's Ray, started now).
    from prefect_rayllm.flows.cli import app

    request.getfixturevalue("ray_session")
    direct_config = tmp_path / "direct.yaml"
    direct_config.write_text(
        yaml.safe_dump(
            {
                "input": str(source),
                "output": str(tmp_path / "direct"),
                "model": {"source": batch_api.model_source, "id": "tiny", **MODEL},
                "sampling": SAMPLING,
                "max_error_rate": 1.0,
            }
        )
    )
    direct_started = time.time()
    outcome = CliRunner().invoke(app, ["batch", str(direct_config), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    timings["direct rayllm batch"] = time.time() - direct_started
    direct_results = _by_custom_id((tmp_path / "direct" / "results.jsonl").read_text())
    direct_errors = _by_custom_id((tmp_path / "direct" / "errors.jsonl").read_text())
    api_results, api_errors = _by_custom_id(output), _by_custom_id(errors)
    assert len(output.splitlines()) == ROWS and len(errors.splitlines()) == 1
    assert set(api_results) == set(direct_results) and set(api_errors) == set(direct_errors) == {"too-long"}
    for custom_id, record in api_results.items():
        assert _comparable(record) == _comparable(direct_results[custom_id]), custom_id
    assert _comparable(api_errors["too-long"]) == _comparable(direct_errors["too-long"])
    assert api_errors["too-long"]["error"]["code"] == "prompt_too_long"

    # In the Prefect UI: the run, completed, with the batch job's artifacts; the key in no flow
    # parameter, artifact, log line or API log.
    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(run.id)
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert run.state.is_completed() and run.run_count >= 2
    output = f"{batch_api.storage}/batches/{batch.id}/"
    expected = {artifact_key("batch-summary", output), artifact_key("batch-report", output)}
    assert expected <= {a.key for a in artifacts}, [a.key for a in artifacts]
    shown = json.dumps(run.parameters) + "\n".join(log.message for log in logs)
    assert KEY not in shown + "\n".join(json.dumps(a.data, default=str) for a in artifacts)
    assert KEY not in batch_api.tail(chars=10**9)
    print(f"\ntimings (s): { {k: round(v, 1) for k, v in timings.items()} }")


@pytest.mark.slow
def test_cancel_mid_run(batch_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    client = batch_api.client()
    uploaded = client.files.create(file=_requests_file(tmp_path / "requests.jsonl").open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    running = _wait(client, batch.id, lambda b: b.in_progress_at is not None, 900, batch_api)
    assert running.status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    cancelled = _wait(client, batch.id, lambda b: b.status == "cancelled", 600, batch_api)
    assert cancelled.cancelled_at and cancelled.completed_at is None
    counts = cancelled.request_counts
    assert counts.total == ROWS + 1 and counts.completed + counts.failed <= ROWS + 1
    if counts.completed:  # the requests finished before the cancel are kept, as OpenAI keeps them
        kept = client.files.content(cancelled.output_file_id).text.splitlines()
        assert len(kept) == counts.completed and all(json.loads(line)["response"]["status_code"] == 200 for line in kept)
    else:
        assert cancelled.output_file_id is None
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    with get_client(sync_client=True) as prefect:
        (run,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch.id])))
    assert run.state.is_cancelled()
