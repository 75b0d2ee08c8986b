"""End to end: the batch flow and `rayllm batch` on real Ray, the real CPU vLLM engine, real Prefect
and a real S3-protocol server."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import openai_line
from prefect_api import artifacts_with_key, wait_for_event
from typer.testing import CliRunner

from prefect_rayllm.flows.batch import ErrorRateExceeded, batch_inference
from prefect_rayllm.flows.cli import app
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob, ResumeRefused
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK
from prefect_rayllm.tasks.reporting import artifact_key

ANSWERS = dict(TOY_TASK)


def toy_requests(count: int) -> list[str]:
    return [openai_line(f"q{i}", TOY_TASK[i % len(TOY_TASK)][0]) for i in range(count)]


def read_jsonl(fs, path: str) -> list[dict]:
    with fs.open(path, "r") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_config(tmp_path: Path, **config) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cli_batch_s3_to_s3_accounts_for_every_line(tmp_path, prefect_server, ray_session, tiny_models, local_s3):
    fs = local_s3.filesystem()
    bucket = local_s3.create_bucket("e2e-cli")
    good = toy_requests(48)
    good.append(openai_line("list-content", [{"type": "text", "text": "Is teal warm or cool?"}]))
    malformed = [
        "this is not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        openai_line("q1", "Is red warm or cool?"),  # duplicate custom_id
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),
        openai_line("too-long", "word " * 400),
    ]
    lines = good + malformed
    with fs.open(f"{bucket}/requests.jsonl", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    config = write_config(
        tmp_path,
        input=f"{bucket}/requests.jsonl",
        output=f"{bucket}/run-1/",
        model={"source": str(tiny_models["good"]), "id": "tiny-good", "engine_kwargs": {"max_model_len": 256}, "batch_size": 16},
        sampling={"temperature": 0.0, "max_tokens": 8},
        max_error_rate=0.2,
        storage_options=local_s3.storage_options,
    )

    outcome = CliRunner().invoke(app, ["batch", str(config), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output

    results = read_jsonl(fs, f"{bucket}/run-1/results.jsonl")
    errors = read_jsonl(fs, f"{bucket}/run-1/errors.jsonl")
    assert len(results) + len(errors) == len(lines)
    assert len(results) == len(good)
    for record in results:
        body = record["response"]["body"]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert body["object"] == "chat.completion" and body["model"] == "tiny-good"
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
        question = (
            "Is teal warm or cool?" if record["custom_id"] == "list-content" else TOY_TASK[int(record["custom_id"][1:]) % 12][0]
        )
        assert body["choices"][0]["message"]["content"] == ANSWERS[question]
    codes = sorted(e["error"]["code"] for e in errors)
    assert codes == sorted(
        ["invalid_json", "missing_custom_id", "duplicate_custom_id", "unsupported_url", "empty_messages", "prompt_too_long"]
    )
    too_long = next(e for e in errors if e["custom_id"] == "too-long")
    assert "maximum context length is 256" in too_long["error"]["message"]
    assert too_long["error"]["line"] == len(lines)

    manifest = json.loads(fs.cat(f"{bucket}/run-1/manifest.json"))
    assert manifest["counts"]["total"] == len(lines)
    assert manifest["counts"]["completed"] == len(good) and manifest["counts"]["failed"] == len(malformed)
    assert manifest["model"]["engine"] == "vllm" and manifest["sampling"]["max_tokens"] == 8
    assert manifest["versions"]["ray"] == "2.60.0" and manifest["versions"]["vllm"]
    assert manifest["flow_run_id"]
    assert manifest["throughput"]["tokens_out"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    assert not fs.exists(f"{bucket}/run-1/_rayllm/parts")

    for kind in ("batch-summary", "batch-report", "batch-progress"):
        (artifact,) = artifacts_with_key(artifact_key(kind, f"{bucket}/run-1/"))
        assert artifact.flow_run_id is not None or artifact.task_run_id is not None
    (progress,) = artifacts_with_key(artifact_key("batch-progress", f"{bucket}/run-1/"))
    assert progress.data == 100.0
    event = wait_for_event("rayllm.batch.completed", f"rayllm.batch.{bucket}/run-1")
    assert event.payload["counts"]["completed"] == len(good)

    # A rerun of a finished job recomputes nothing and changes nothing.
    again = CliRunner().invoke(app, ["batch", str(config), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert read_jsonl(fs, f"{bucket}/run-1/results.jsonl") == results


def test_changed_config_refuses_to_resume(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(toy_requests(3)) + "\n")
    config = BatchJobConfig(input=str(source), output=str(tmp_path / "out"), model={"source": "./m"}, sampling={"max_tokens": 8})
    assert BatchJob(config).prepare().total_rows == 3
    changed = config.model_copy(update={"sampling": config.sampling.model_copy(update={"max_tokens": 9})})
    with pytest.raises(ResumeRefused, match='sampling.*"max_tokens": 8.*"max_tokens": 9.*--overwrite'):
        BatchJob(changed).prepare()
    assert BatchJob(changed).prepare(overwrite=True).done_rows == 0
    source.write_text("\n".join(toy_requests(4)) + "\n")
    with pytest.raises(ResumeRefused, match="the input file changed"):
        BatchJob(changed).prepare()


def test_flow_fails_above_max_error_rate_after_writing_everything(tmp_path, prefect_server, ray_session):
    source = tmp_path / "in.jsonl"
    source.write_text("nope\n{}\n[]\n")
    config = BatchJobConfig(input=str(source), output=str(tmp_path / "out"), model={"source": "./unused"}, max_error_rate=0.5)
    state = batch_inference(config=config, return_state=True)
    assert state.is_failed()
    with pytest.raises(ErrorRateExceeded, match="3 of 3 rows failed"):
        state.result()
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["error"]["line"] for e in errors] == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["failed"] == 3
    wait_for_event("rayllm.batch.failed", f"rayllm.batch.{tmp_path / 'out'}")


@pytest.mark.slow
def test_parquet_table_with_template(tmp_path, prefect_server, ray_session, tiny_models):
    questions = [q for q, _ in TOY_TASK]
    table = pa.table({"qid": [f"t{i}" for i in range(len(questions))] + ["t-null"], "colour_question": questions + [None]})
    pq.write_table(table, tmp_path / "questions.parquet")
    config = BatchJobConfig(
        input=str(tmp_path / "questions.parquet"),
        output=str(tmp_path / "out"),
        id_column="qid",
        prompt={"user": "{{ colour_question }}"},
        model={"source": str(tiny_models["good"]), "engine_kwargs": {"max_model_len": 256}},
        sampling={"max_tokens": 8},
        max_error_rate=0.1,
    )
    manifest = batch_inference(config=config)
    assert manifest.input["format"] == "parquet" and manifest.prompt_template_hash
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["qid"] for r in rows) == sorted(f"t{i}" for i in range(len(questions)))
    for row in rows:
        assert row["generated_text"] == ANSWERS[row["colour_question"]]
        assert row["finish_reason"] == "stop" and row["num_input_tokens"] > 0
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["row_id"] == "t-null" and error["error"]["code"] == "missing_field"
