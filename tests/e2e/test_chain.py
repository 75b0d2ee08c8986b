"""Chains: validation up front, the chain end to end through the CLI on real tiny models, per-step
errors, and resume after a fault injected in step 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app
from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
from prefect_rayllm.rayllm_stages.jobs.run_log import read_part
from prefect_rayllm.rayllm_stages.testing.faults import StepFaultInjector
from prefect_rayllm.rayllm_stages.testing.tiny_models import REWRITE_TASK, TOY_TASK, build_tiny_chat_model

COLOURS = [q.split()[1] for q, _ in TOY_TASK]
ANSWER = {q.split()[1]: a for q, a in TOY_TASK}
# An enum keeps even a random-weight model's reply short; an open integer can run to max_tokens
# and end as truncated JSON (which the step then reports as a row error).
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}, "required": ["score"]}


@pytest.fixture(scope="session")
def rewriter(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-rewriter", trained=True, task=REWRITE_TASK)


def colour_table(path: Path, extra: list[dict] | None = None) -> Path:
    rows = [{"cid": f"c{i}", "colour": c} for i, c in enumerate(COLOURS)] + (extra or [])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def chain_config(source: Path, output: Path, rewriter: Path, answerer: Path, scorer: Path | None = None, **extra) -> dict:
    model = lambda folder: {"source": str(folder), "engine_kwargs": {"max_model_len": 256}, "batch_size": 8}  # noqa: E731
    steps = [
        {
            "name": "reformat",
            "model": model(rewriter),
            "prompt": {"user": "Rewrite as a question: {{ colour }}"},
            "sampling": {"max_tokens": 16},
            "output_column": "question",
        },
        {
            "name": "answer",
            "model": model(answerer),
            "prompt": {"user": "{{ question }}"},
            "sampling": {"max_tokens": 8},
            "output_column": "answer",
        },
    ]
    if scorer is not None:
        steps.append(
            {
                "name": "score",
                "model": model(scorer),
                "prompt": {"user": "Score: {{ answer }}"},
                "sampling": {"max_tokens": 24},
                "output_column": "score",
                "parse": "json",
                "json_schema": SCORE_SCHEMA,
            }
        )
    return {"input": str(source), "output": str(output), "id_column": "cid", "steps": steps, **extra}


def test_templates_are_checked_against_columns_and_earlier_steps(tmp_path):
    source = colour_table(tmp_path / "in.jsonl")
    config = chain_config(source, tmp_path / "out", Path("r"), Path("a"))
    config["steps"][0]["prompt"]["user"] = "{{ answer }} {{ colour }}"
    with pytest.raises(
        ConfigError,
        match=r"steps\[0\] \(reformat\)\.prompt\.user uses 'answer', which step 'answer' \(steps\[1\]\) produces only later",
    ):
        ChainJob(ChainJobConfig.model_validate(config)).check_input()
    config["steps"][0]["prompt"]["user"] = "{{ colur }}"
    with pytest.raises(
        ConfigError,
        match=r"steps\[0\] \(reformat\)\.prompt\.user uses field 'colur' that neither the input nor an earlier step produces",
    ):
        ChainJob(ChainJobConfig.model_validate(config)).check_input()
    config["steps"][0]["prompt"]["user"] = "{{ colour }}"
    config["steps"][0]["output_column"] = "colour"
    with pytest.raises(ConfigError, match="output_column.*'colour' already exist"):
        ChainJob(ChainJobConfig.model_validate(config)).check_input()


def test_step_names_and_json_settings_are_validated():
    from prefect_rayllm.rayllm_stages.config.base import validate_config

    base = chain_config(Path("x"), Path("y"), Path("r"), Path("a"))
    base["steps"][1]["name"] = "reformat"
    with pytest.raises(ConfigError, match="step names must be unique; repeated: reformat"):
        validate_config(ChainJobConfig, base)
    base = chain_config(Path("x"), Path("y"), Path("r"), Path("a"))
    base["steps"][1]["parse"] = "json"
    with pytest.raises(ConfigError, match="steps.1: parse 'json' needs json_schema"):
        validate_config(ChainJobConfig, base)


@pytest.mark.slow
def test_cli_chain_reformat_answer_score(tmp_path, prefect_server, ray_session, tiny_models, rewriter):
    source = colour_table(tmp_path / "in.jsonl", extra=[{"cid": "no-colour", "colour": None}])
    config_path = tmp_path / "chain.yaml"
    config_path.write_text(
        yaml.safe_dump(
            chain_config(source, tmp_path / "out", rewriter, tiny_models["good"], scorer=tiny_models["bad"], max_error_rate=0.2)
        )
    )

    outcome = CliRunner().invoke(app, ["chain", str(config_path), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output

    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(results) + len(errors) == len(COLOURS) + 1
    for row in results:
        assert row["question"] == f"Is {row['colour']} warm or cool?"
        assert row["answer"] == ANSWER[row["colour"]]
        assert row["score"]["score"] in (1, 2, 3, 4, 5)  # schema-valid JSON from the untrained model
        assert set(row["_usage"]) == {"reformat", "answer", "score"}
    (error,) = [e for e in errors if e["row_id"] == "no-colour"]
    assert error["failed_step"] == "reformat" and error["error"]["code"] == "step_error"
    assert "'colour' are null" in error["error"]["message"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job"] == "chain"
    steps = {s["name"]: s for s in manifest["steps"]}
    assert steps["reformat"]["errors"] == 1 and steps["reformat"]["rows"] == len(results)
    assert steps["answer"]["tokens_out"] > 0 and steps["score"]["rows"] == len(results)


@pytest.mark.slow
def test_rerun_after_fault_in_step_two_does_not_recompute_step_one(tmp_path, ray_session, tiny_models, rewriter):
    rows = [{"cid": f"r{i}", "colour": COLOURS[i % 12]} for i in range(120)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = ChainJobConfig.model_validate(chain_config(source, tmp_path / "out", rewriter, tiny_models["good"]))

    crashing = ChainJob(config)
    crashing.prepare()
    crashing.steps[1] = StepFaultInjector(crashing.steps[1], after_rows=20, marker=str(tmp_path / "fault-fired"))
    with pytest.raises(Exception, match="injected fault"):
        crashing.execute()
    step_one_log = crashing._step_log(0)
    first_attempt = {r["row_index"] for part, _ in step_one_log.complete_parts() for r in read_part(part)}
    assert first_attempt, "step 1 should have finished some rows before step 2 crashed"

    rerun = ChainJob(config)
    assert rerun.prepare().resumed or rerun.log.done_indexes() == set()
    rerun.execute()
    recomputed = [r["row_index"] for part, stats in step_one_log.complete_parts() if stats.attempt == 2 for r in read_part(part)]
    assert not set(recomputed) & first_attempt, "rows that finished step 1 were computed again"
    manifest = rerun.finalize()
    assert manifest.counts.completed == len(rows)
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cid"] for r in results) == sorted(r["cid"] for r in rows)
    assert all(r["answer"] == ANSWER[r["colour"]] for r in results)


@pytest.mark.slow
def test_steps_and_runs_share_one_serve_engine(tmp_path, prefect_server, ray_session, tiny_models):
    from ray import serve

    from prefect_rayllm.flows.chain import run_chain
    from prefect_rayllm.rayllm_stages.llm.serve_engine import delete_engine

    shared = {
        "source": str(tiny_models["good"]),
        "engine": "serve",
        "serve_app": "rayllm-test-shared",
        "keep_serving": True,
        "engine_kwargs": {"max_model_len": 256},
        "batch_size": 8,
    }
    too_long = {"cid": "too-long", "colour": "red " * 400}
    source = colour_table(tmp_path / "in.jsonl", extra=[too_long])

    def config(output: str) -> ChainJobConfig:
        return ChainJobConfig.model_validate(
            {
                "input": str(source),
                "output": str(tmp_path / output),
                "id_column": "cid",
                "max_error_rate": 0.2,
                "steps": [
                    {
                        "name": "answer",
                        "model": shared,
                        "prompt": {"user": "Is {{ colour }} warm or cool?"},
                        "sampling": {"max_tokens": 8},
                        "output_column": "answer",
                    },
                    {
                        "name": "score",
                        "model": shared,
                        "prompt": {"user": "Score: {{ answer }}"},
                        "sampling": {"max_tokens": 24},
                        "output_column": "score",
                        "parse": "json",
                        "json_schema": SCORE_SCHEMA,
                    },
                ],
            }
        )

    try:
        first = run_chain(config("first"))
        second = run_chain(config("second"))
        app = serve.status().applications["rayllm-test-shared"]
        (deployment,) = app.deployments.values()
        assert deployment.replica_states == {"RUNNING": 1}, "one engine for both steps and both runs"
    finally:
        delete_engine("rayllm-test-shared")
    assert [e["deployed_here"] for e in first.engines] == [True]
    assert [e["deployed_here"] for e in second.engines] == [False]
    assert "rayllm-test-shared" not in serve.status().applications

    results = [json.loads(line) for line in (tmp_path / "first" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["colour"] for r in results) == sorted(COLOURS)
    assert all(r["answer"] == ANSWER[r["colour"]] and r["score"]["score"] in (1, 2, 3, 4, 5) for r in results)
    (error,) = [json.loads(line) for line in (tmp_path / "first" / "errors.jsonl").read_text().splitlines()]
    assert error["row_id"] == "too-long" and error["failed_step"] == "answer"
    assert "256" in error["error"]["message"], error  # the engine's reason (context length) is kept
