"""The Batch API through the real `openai` client, in process (no run started here): files, the
key, errors in OpenAI's shape, and a batch whose file fails the checks. Runs: tests/e2e/test_batch_api.py."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import openai_line
from fastapi.testclient import TestClient

from prefect_rayllm.flows.api.app import create_app
from prefect_rayllm.flows.api.config import ApiConfig
from prefect_rayllm.flows.api.runs import SeenRun, orphaned
from prefect_rayllm.rayllm_stages.batch_api.objects import RunView

KEY = "sk-rayllm-test-3c1d-not-real"


@pytest.fixture
def api(tmp_path):
    config = ApiConfig(storage=str(tmp_path / "store"), models={"tiny": {"source": str(tmp_path / "tiny")}})
    with TestClient(create_app(config, KEY, sweep=False)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0), http


def test_files_round_trip(api, tmp_path):
    client, _ = api
    body = ("\n".join(openai_line(f"r{i}", "Hi") for i in range(3)) + "\n").encode()
    uploaded = client.files.create(file=("requests.jsonl", body), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.filename, uploaded.bytes) == (
        "file",
        "batch",
        "requests.jsonl",
        len(body),
    )
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == body
    second = client.files.create(file=("more.jsonl", b"{}\n"), purpose="batch")
    assert [f.id for f in client.files.list()] == [second.id, uploaded.id]  # newest first
    assert [f.id for f in client.files.list(order="asc", limit=1)] == [uploaded.id, second.id]  # the SDK pages on
    assert list(client.files.list(purpose="batch_output")) == []
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-../../etc")
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_the_key_is_required(api):
    _, http = api
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = http.get("/v1/files", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in response.text
    assert http.get("/health").status_code == 200
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()


def test_bad_requests_come_back_in_openai_shape(api):
    client, _ = api
    with pytest.raises(openai.BadRequestError) as error:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert error.value.body["param"] == "purpose" and "(supported: batch)" in error.value.body["message"]
    uploaded = client.files.create(file=("x.jsonl", openai_line("a", "Hi").encode()), purpose="batch")
    for field, value in (("endpoint", "/v1/embeddings"), ("completion_window", "1d")):
        params = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", field: value}
        with pytest.raises(openai.BadRequestError) as error:
            client.batches.create(**params)
        assert error.value.body["param"] == field
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v" * 600}
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")


def test_a_file_that_fails_the_checks_fails_its_batch_with_the_lines_named(api):
    client, _ = api
    lines = [openai_line("a", "Hi"), "not json", openai_line("b", "Hi", model="gpt-4o")]
    uploaded = client.files.create(file=("bad.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"team": "search"}
    )
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_json"), (3, "model_not_found")]
    assert batch.errors.data[1].message == "line 3: body.model 'gpt-4o' is not served here; known models: tiny"
    assert client.batches.retrieve(batch.id) == batch
    assert [b.id for b in client.batches.list()] == [batch.id]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def _seen(state: str, state_at: float, served: bool, heartbeat: float | None = None) -> SeenRun:
    return SeenRun(RunView(state=state, state_at=state_at), served=served, last_heartbeat=heartbeat)


def test_a_run_is_orphaned_only_when_its_process_is_known_to_be_gone():
    now, started = 10_000.0, 9_000.0  # this process serves the deployment since `started`
    served = dict(now=now, serving_since=started, stale_after_s=600)
    # served by this process: a predecessor's run, and no process here runs it
    assert orphaned(_seen("RUNNING", 8_000, True), alive_here=False, **served)
    assert orphaned(_seen("PENDING", 8_000, True), alive_here=False, **served)
    assert orphaned(_seen("CANCELLING", 8_000, True), alive_here=False, **served)
    assert not orphaned(_seen("RUNNING", 8_000, True), alive_here=True, **served)
    assert not orphaned(_seen("PENDING", 9_500, True), alive_here=False, **served)  # this process's own runner
    for final in ("SCHEDULED", "COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
        assert not orphaned(_seen(final, 8_000, True), alive_here=False, **served)
    # run by a worker: heartbeats tell, and nothing without them
    workers = dict(now=now, serving_since=None, alive_here=False, stale_after_s=600)
    assert orphaned(_seen("RUNNING", 8_000, False, heartbeat=9_300), **workers)
    assert not orphaned(_seen("RUNNING", 8_000, False, heartbeat=9_500), **workers)
    assert not orphaned(_seen("RUNNING", 1_000, False, heartbeat=None), **workers)
    assert not orphaned(_seen("PENDING", 1_000, False, heartbeat=None), **workers)
    # a worker's run seen by a process that serves the deployment too: still by heartbeats
    assert not orphaned(_seen("RUNNING", 8_000, False, heartbeat=9_500), alive_here=False, **served)


def test_job_config_names_the_model_and_holds_no_key(tmp_path, monkeypatch):
    from prefect_rayllm.flows.api.runs import BatchRuns
    from prefect_rayllm.flows.api.service import BatchService
    from prefect_rayllm.rayllm_stages.batch_api.objects import BatchRecord, FileRecord
    from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig

    monkeypatch.setenv("RAYLLM_API_KEY", KEY)
    config = ApiConfig(
        storage=str(tmp_path),
        models={"big": {"source": "/models/llama", "id": "llama-internal", "engine_kwargs": {"max_model_len": 4096}}},
        sampling={"max_tokens": 128},
        commit_every_rows=50,
    )
    service = BatchService(config, BatchRuns(config.deployment))
    record = BatchRecord(
        id="batch_1", input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h",
        created_at=0, model="big", output_url=str(tmp_path / "batches" / "batch_1") + "/",
    )  # fmt: skip
    source = FileRecord(id="file-1", bytes=1, created_at=0, filename="a", purpose="batch", url=str(tmp_path / "a.jsonl"))
    parameters = service.job_config(record, source)
    job = BatchJobConfig.model_validate(parameters)
    assert job.model.served_name == "big" and job.model.source == "/models/llama"  # outputs name the requested model
    assert (job.input, job.output, job.input_format) == (source.url, record.output_url, "openai_batch")
    assert job.max_error_rate == 1.0 and job.sampling.max_tokens == 128 and job.commit_every_rows == 50
    assert KEY not in json.dumps(parameters)


def test_the_deployable_app_reads_its_config_and_key_from_the_environment(tmp_path, monkeypatch):
    from prefect_rayllm.flows.api.app import app_from_env
    from prefect_rayllm.rayllm_stages.config.base import ConfigError

    config = tmp_path / "api.yaml"
    config.write_text(f"storage: {tmp_path / 'store'}\nmodels:\n  tiny: {{source: ./tiny}}\napi_key_env: MY_BATCH_KEY\n")
    monkeypatch.setenv("RAYLLM_API_CONFIG", str(config))
    monkeypatch.delenv("MY_BATCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_BATCH_KEY is not set"):
        app_from_env()
    monkeypatch.setenv("MY_BATCH_KEY", KEY)
    with TestClient(app_from_env()) as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == "tiny"
    config.write_text("models: {}\nstorag: x\n")
    with pytest.raises(ConfigError, match="storag: unknown key"):
        app_from_env()


def test_a_batch_fails_at_once_when_its_deployment_is_not_registered(tmp_path, prefect_server):
    config = ApiConfig(
        storage=str(tmp_path / "store"),
        models={"tiny": {"source": str(tmp_path / "tiny")}},
        deployment="batch-inference/not-registered-here",
    )
    with TestClient(create_app(config, KEY, sweep=False)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", openai_line("a", "Hi").encode()), purpose="batch")
        with pytest.raises(openai.InternalServerError) as error:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert error.value.status_code == 503 and "rayllm deploy" in error.value.body["message"]
        (batch,) = client.batches.list()
        assert batch.status == "failed" and batch.errors.data[0].code == "run_not_created"
        assert "not-registered-here" in batch.errors.data[0].message
