"""The http engine against a real OpenAI-compatible server (vLLM's own) on loopback."""

from __future__ import annotations

import json

import pytest
from conftest import OPENAI_SERVER_KEY, openai_line
from prefect_api import artifacts_with_key

from prefect_rayllm.flows.batch import batch_inference
from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK
from prefect_rayllm.tasks.reporting import artifact_key


@pytest.mark.slow
def test_http_engine_results_errors_and_no_key_leak(tmp_path, prefect_server, ray_session, openai_server, monkeypatch):
    monkeypatch.setenv("TINY_SERVER_KEY", OPENAI_SERVER_KEY)
    lines = [openai_line(f"h{i}", q) for i, (q, _) in enumerate(TOY_TASK)]
    lines.append(openai_line("too-long", "word " * 400))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    config = BatchJobConfig(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out"),
        model={
            "source": "tiny-good",
            "engine": "http",
            "base_url": openai_server,
            "api_key_env": "TINY_SERVER_KEY",
            "concurrency": 2,
            "batch_size": 4,
        },
        sampling={"max_tokens": 8},
        max_error_rate=0.2,
    )
    manifest = batch_inference(config=config)

    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(results) == len(TOY_TASK) and len(errors) == 1
    for record in results:
        index = int(record["custom_id"][1:])
        assert record["response"]["body"]["choices"][0]["message"]["content"] == TOY_TASK[index][1]
        assert record["response"]["body"]["usage"]["completion_tokens"] > 0
    (error,) = errors
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 400
    assert error["error"]["code"] == "prompt_too_long"
    assert manifest.counts.completed == len(TOY_TASK)

    # The key never lands in outputs, the manifest, artifacts or the flow parameters.
    for name in ("results.jsonl", "errors.jsonl", "manifest.json"):
        assert OPENAI_SERVER_KEY not in (tmp_path / "out" / name).read_text()
    assert OPENAI_SERVER_KEY not in config.model_dump_json()
    for kind in ("batch-summary", "batch-report"):
        (artifact,) = artifacts_with_key(artifact_key(kind, config.output))
        assert OPENAI_SERVER_KEY not in str(artifact.data)


def test_missing_api_key_env_is_named(monkeypatch):
    from prefect_rayllm.tasks.secrets import resolve_api_key

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    spec = BatchJobConfig(
        input="x",
        output="y",
        model={"source": "m", "engine": "http", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "NOT_SET_ANYWHERE"},
    ).model
    with pytest.raises(ConfigError, match="model.api_key_env: environment variable NOT_SET_ANYWHERE is not set"):
        resolve_api_key(spec)


@pytest.mark.slow
def test_wrong_api_key_rows_become_errors_not_silent_rows(tmp_path, prefect_server, ray_session, openai_server):
    (tmp_path / "in.jsonl").write_text(openai_line("a", "Is red warm or cool?") + "\n")
    config = BatchJobConfig(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out"),
        model={"source": "tiny-good", "engine": "http", "base_url": openai_server},
        max_error_rate=1.0,
    )
    manifest = batch_inference(config=config)
    assert manifest.counts.failed == 1
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["response"]["status_code"] == 401 and error["error"]["code"] == "engine_error"


def _server_requests(base_url: str) -> float:
    """Requests vLLM's server finished, from its Prometheus metrics (not behind the API key)."""
    import urllib.request

    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{"))


@pytest.mark.slow
def test_a_row_failed_at_step_one_sends_nothing_to_an_http_step_two(
    tmp_path, prefect_server, ray_session, openai_server, monkeypatch
):
    """An endpoint may bill per request: a row that failed earlier never reaches it, whatever its
    block holds (blocks of 4 here: some all failed, some mixed), and every row is accounted for."""
    from prefect_rayllm.flows.chain import run_chain
    from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig

    monkeypatch.setenv("TINY_SERVER_KEY", OPENAI_SERVER_KEY)
    colours = [q.split()[1] for q, _ in TOY_TASK]
    pattern = "BBBBGGBGBBBBGGGG"  # G: a colour; B: a prompt longer than the server's context
    rows = [
        {"cid": f"r{i}", "colour": colours[i % len(colours)] if kind == "G" else "red " * 400} for i, kind in enumerate(pattern)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {
        "source": "tiny-good",
        "engine": "http",
        "base_url": openai_server,
        "api_key_env": "TINY_SERVER_KEY",
        "batch_size": 4,
    }
    config = ChainJobConfig.model_validate(
        {
            "input": str(tmp_path / "in.jsonl"),
            "output": str(tmp_path / "out"),
            "id_column": "cid",
            "max_error_rate": 1.0,
            "steps": [
                {
                    "name": "answer",
                    "model": model,
                    "prompt": {"user": "Is {{ colour }} warm or cool?"},
                    "sampling": {"max_tokens": 8},
                    "output_column": "answer",
                },
                {
                    "name": "again",
                    "model": model,
                    "prompt": {"user": "Is {{ colour }} warm or cool?"},
                    "sampling": {"max_tokens": 8},
                    "output_column": "again",
                },
            ],
        }
    )
    before = _server_requests(openai_server)
    manifest = run_chain(config)
    sent = _server_requests(openai_server) - before

    good = pattern.count("G")
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert sorted(r["_row_id"] for r in results) == sorted(f"r{i}" for i, k in enumerate(pattern) if k == "G")
    assert all(r["again"] == r["answer"] for r in results)
    assert len(errors) == pattern.count("B") and {e["failed_step"] for e in errors} == {"answer"}
    assert manifest.counts.completed == good
    # The server refused step one's over-long prompts before its engine (not counted as finished);
    # each step finished one request per good row, and step two got none for the failed rows.
    assert sent == 2 * good, f"the server finished {sent} requests; expected {good} per step"
