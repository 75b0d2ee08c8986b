"""End to end: a batch job whose S3 credentials come from a block named in its config (real Prefect,
Ray, CPU vLLM and a moto S3 that only the block's endpoint reaches). The job reads and writes through
the block, and neither the access key id nor the secret is anywhere Prefect keeps or shows things:
the flow run's parameters, its task runs, its logs, its artifacts, its persisted result, the
database file itself, nor any file the job wrote to its output."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import s3fs
import yaml
from conftest import openai_line
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import get_current_settings
from typer.testing import CliRunner

from prefect_rayllm.flows.batch import batch_inference
from prefect_rayllm.flows.cli import app
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK
from prefect_rayllm.tasks.blocks import S3Credentials


def _local_files(setting: Any, since: float = 0.0) -> list[Path]:
    """The files of a sqlite database (and its journals), or of a folder written since `since`."""
    value = setting.get_secret_value() if hasattr(setting, "get_secret_value") else setting
    if not value:
        return []
    path = Path(str(value).split("///", 1)[-1]).expanduser()
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file() and p.stat().st_mtime >= since]
    return [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")) if p.is_file()]


@pytest.mark.slow
def test_batch_through_a_credentials_block_keeps_the_secret_out_of_prefect_and_outputs(
    prefect_server, ray_session, tiny_models, local_s3
):
    started = time.time()
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "rayllm-secret-" + uuid.uuid4().hex
    block_name = f"e2e-s3-{uuid.uuid4().hex[:8]}"
    S3Credentials(endpoint_url=local_s3.endpoint_url, aws_access_key_id=key_id, aws_secret_access_key=secret).save(block_name)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made earlier in this process answers for the job
    fs = s3fs.S3FileSystem(key=key_id, secret=secret, client_kwargs={"endpoint_url": local_s3.endpoint_url})
    bucket = local_s3.create_bucket("e2e-block")
    requests = [openai_line(f"q{i}", TOY_TASK[i % len(TOY_TASK)][0]) for i in range(12)]
    with fs.open(f"{bucket}/requests.jsonl", "w") as handle:
        handle.write("\n".join(requests) + "\n")

    config = BatchJobConfig(
        input=f"{bucket}/requests.jsonl",
        output=f"{bucket}/run/",
        model={"source": str(tiny_models["good"]), "id": "tiny-good", "engine_kwargs": {"max_model_len": 256}, "batch_size": 4},
        sampling={"temperature": 0.0, "max_tokens": 8},
        storage_block=block_name,  # no storage_options: without the block the job reaches no S3 at all
        commit_every_rows=4,
    )
    state = batch_inference(config=config, return_state=True)
    assert state.is_completed(), state.message
    manifest = state.result()
    assert manifest.counts.completed == len(requests) and manifest.counts.failed == 0

    with fs.open(f"{bucket}/run/results.jsonl") as handle:
        results = [json.loads(line) for line in handle if line.strip()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"q{i}" for i in range(len(requests)))

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert run.parameters["config"]["storage_block"] == block_name
    assert logs and artifacts and task_runs  # the scan below reads something
    shown = {
        "parameters": json.dumps(run.parameters),
        "flow run": run.model_dump_json(),
        "task runs": "\n".join(t.model_dump_json() for t in task_runs),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(a.model_dump_json() for a in artifacts),
        "result": manifest.model_dump_json(),
    }
    for path in fs.find(f"{bucket}/run/"):
        shown[f"output {path}"] = fs.cat_file(path).decode("utf-8", "replace")
    assert any(name.endswith("manifest.json") for name in shown), sorted(shown)
    settings = get_current_settings()
    database = _local_files(settings.server.database.connection_url)
    assert database, f"no sqlite database file at {settings.server.database.connection_url}"
    for path in database + _local_files(settings.results.local_storage_path, since=started):
        shown[f"file {path}"] = path.read_bytes().decode("latin-1")

    for what, text in shown.items():
        assert secret not in text, f"the secret key is in {what}"
        assert key_id not in text, f"the access key id is in {what}"


@pytest.mark.slow
def test_cli_batch_reads_and_writes_through_the_block_it_names(tmp_path, prefect_server, ray_session, tiny_models, local_s3):
    """`rayllm batch` with `storage_block`: the input check before the run, the run and the output
    all go through the block; the command prints neither the key id nor the secret."""
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "rayllm-secret-" + uuid.uuid4().hex
    block_name = f"cli-s3-{uuid.uuid4().hex[:8]}"
    S3Credentials(endpoint_url=local_s3.endpoint_url, aws_access_key_id=key_id, aws_secret_access_key=secret).save(block_name)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key=key_id, secret=secret, client_kwargs={"endpoint_url": local_s3.endpoint_url})
    bucket = local_s3.create_bucket("cli-block")
    with fs.open(f"{bucket}/requests.jsonl", "w") as handle:
        handle.write("\n".join(openai_line(f"r{i}", TOY_TASK[i][0]) for i in range(4)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": f"{bucket}/requests.jsonl",
                "output": f"{bucket}/run/",
                "model": {"source": str(tiny_models["good"]), "engine_kwargs": {"max_model_len": 256}, "batch_size": 4},
                "sampling": {"max_tokens": 8},
                "storage_block": block_name,
            }
        )
    )
    outcome = CliRunner().invoke(app, ["batch", str(config), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    assert secret not in outcome.output and key_id not in outcome.output
    manifest = json.loads(fs.cat_file(f"{bucket}/run/manifest.json"))
    assert manifest["counts"] == {**manifest["counts"], "total": 4, "completed": 4, "failed": 0}
    for path in fs.find(f"{bucket}/run/"):
        text = fs.cat_file(path).decode("utf-8", "replace")
        assert secret not in text and key_id not in text, path
