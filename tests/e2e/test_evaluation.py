"""Evaluation: config and dataset checks, records joined from the chains' outputs, and the flow end
to end (CLI with a trained and an untrained model and a judge; baselines from Prefect and files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import OPENAI_SERVER_KEY
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app
from prefect_rayllm.rayllm_stages.config.base import ConfigError, validate_config
from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.evaluation.run import check_evaluation, collect_records, score_records
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

JUDGE_RUBRIC = {"user": "Question: {{ question }}\nExpected: {{ answer }}\nReply: {{ prediction }}\nScore 1 to 5."}


def write_dataset(path: Path, repeat: int = 2, extra: list[dict] | None = None) -> Path:
    rows = [
        {"qid": f"q{r}-{i}", "question": q, "answer": a, "tags": [a]} for r in range(repeat) for i, (q, a) in enumerate(TOY_TASK)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows + (extra or [])) + "\n")
    return path


def base_config(dataset: Path, output: Path, targets: list[dict], **extra) -> dict:
    return {
        "name": "colours",
        "dataset": {"path": str(dataset), "id_field": "qid", "input_field": "question", "reference_field": "answer"},
        "output": str(output),
        "targets": targets,
        "prompt": {"user": "{{ question }}"},
        "sampling": {"max_tokens": 8},
        "metrics": [{"type": "exact_match"}, {"type": "latency"}, {"type": "tokens"}],
        **extra,
    }


def http_target(name: str, base_url: str) -> dict:
    return {
        "name": name,
        "model": {
            "source": "tiny-good",
            "engine": "http",
            "base_url": base_url,
            "api_key_env": "TINY_SERVER_KEY",
            "batch_size": 8,
        },
    }


def test_config_names_what_is_wrong(tmp_path):
    dataset = write_dataset(tmp_path / "eval.jsonl")
    target = {"name": "t", "model": {"source": "m"}}
    config = base_config(dataset, tmp_path / "out", [target], gate={"min": {"exact_match": 0.8, "acuracy": 0.5}})
    with pytest.raises(ConfigError, match="acuracy"):
        validate_config(EvaluationConfig, config)
    config = base_config(dataset, tmp_path / "out", [target], metrics=[{"type": "judge"}])
    with pytest.raises(ConfigError, match="needs the judge section"):
        validate_config(EvaluationConfig, config)
    config = base_config(dataset, tmp_path / "out", [target, target])
    with pytest.raises(ConfigError, match="target names must be unique; repeated: t"):
        validate_config(EvaluationConfig, config)
    config = base_config(dataset, tmp_path / "out", [target], baseline={"target": "nope"})
    with pytest.raises(ConfigError, match="baseline.target 'nope' is not a target"):
        validate_config(EvaluationConfig, config)


def test_dataset_checks_name_the_examples_and_fields(tmp_path):
    dataset = write_dataset(tmp_path / "eval.jsonl", repeat=1, extra=[{"qid": "no-ref", "question": "Is red warm or cool?"}])
    target = {"name": "t", "model": {"source": "m"}}
    config = EvaluationConfig.model_validate(base_config(dataset, tmp_path / "out", [target]))
    with pytest.raises(
        ConfigError, match=r"dataset.reference_field 'answer': 1 example\(s\) lack a usable reference that a metric needs: no-ref"
    ):
        check_evaluation(config)
    config = EvaluationConfig.model_validate(base_config(dataset, tmp_path / "out", [target], prompt={"user": "{{ questoin }}"}))
    with pytest.raises(ConfigError, match="uses field 'questoin' that neither the input nor an earlier step produces"):
        check_evaluation(config)


def test_records_join_answers_errors_and_judge_errors(tmp_path):
    """Every example becomes a record: answered, failed at the target (reason kept), or judged
    with an error; none disappears."""
    dataset = write_dataset(tmp_path / "eval.jsonl", repeat=1)
    config = EvaluationConfig.model_validate(
        base_config(
            dataset,
            tmp_path / "out",
            [{"name": "t", "model": {"source": "m"}}],
            metrics=[{"type": "exact_match"}, {"type": "judge"}],
            judge={"model": {"source": "j"}, "rubric": JUDGE_RUBRIC},
        )
    )
    target = config.targets[0]
    answers = tmp_path / "out" / "targets" / "t" / "answers"
    judge = tmp_path / "out" / "targets" / "t" / "judge"
    answers.mkdir(parents=True)
    judge.mkdir(parents=True)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    answered = [
        {**row, "prediction": row["answer"], "_row_id": row["qid"], "_usage": {"answer": {"in": 5, "out": 2, "latency_s": 0.1}}}
        for row in rows[1:]
    ]
    (answers / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answered))
    (answers / "errors.jsonl").write_text(
        json.dumps(
            {
                "row_index": 0,
                "row_id": "q0-0",
                "failed_step": "answer",
                "error": {"code": "engine_error", "message": "HTTP 500: boom"},
            }
        )
        + "\n"
    )
    judged = [{**r, "judgement": {"score": 5}} for r in answered[1:]]
    (judge / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judged))
    (judge / "errors.jsonl").write_text(
        json.dumps(
            {
                "row_index": 0,
                "row_id": answered[0]["qid"],
                "failed_step": "judge",
                "error": {"code": "step_error", "message": "reply is not valid JSON"},
            }
        )
        + "\n"
    )

    records = {r["id"]: r for r in collect_records(config, target)}
    assert len(records) == len(rows)
    assert records["q0-0"]["error"] == "HTTP 500: boom" and records["q0-0"]["prediction"] is None
    assert records[answered[0]["qid"]]["judge_error"] == "reply is not valid JSON"
    scored = {s.id: s for s in score_records(config, list(records.values()))}
    assert scored["q0-0"].scores["exact_match"] == 0.0  # failed: in the denominator as a miss
    assert scored[answered[0]["qid"]].scores["judge"] is None  # judge error: not a zero
    assert scored[answered[1]["qid"]].scores == {"exact_match": 1.0, "judge": 1.0}


def test_records_without_an_id_field_join_by_row_number_not_by_result_order(tmp_path):
    """Results arrive in completion order: the join must use each result's row id."""
    dataset = write_dataset(tmp_path / "eval.jsonl", repeat=1)
    config = EvaluationConfig.model_validate(
        base_config(
            dataset,
            tmp_path / "out",
            [{"name": "t", "model": {"source": "m"}}],
            metrics=[{"type": "exact_match"}],
        )
    )
    config = config.model_copy(update={"dataset": config.dataset.model_copy(update={"id_field": None})})
    answers = tmp_path / "out" / "targets" / "t" / "answers"
    answers.mkdir(parents=True)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    finished_last_first = [{**row, "prediction": row["answer"], "_row_id": str(i), "_usage": {}} for i, row in enumerate(rows)][
        ::-1
    ]
    (answers / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished_last_first))

    records = collect_records(config, config.targets[0])
    assert [r["id"] for r in records] == [str(i) for i in range(len(rows))]
    assert all(r["prediction"] == r["reference"] for r in records)
    assert {s.scores["exact_match"] for s in score_records(config, records)} == {1.0}


@pytest.mark.slow
def test_cli_trained_model_passes_the_gate_and_untrained_fails(
    tmp_path, prefect_server, ray_session, tiny_models, openai_server, monkeypatch
):
    from prefect_api import wait_for_event

    monkeypatch.setenv("TINY_SERVER_KEY", OPENAI_SERVER_KEY)
    dataset = write_dataset(
        tmp_path / "eval.jsonl",
        extra=[
            {"qid": "too-long", "question": "Is red " + "very " * 300 + "warm or cool?", "answer": "warm", "tags": ["warm"]},
        ],
    )
    vllm = lambda folder: {"source": str(folder), "engine_kwargs": {"max_model_len": 256}, "batch_size": 8}  # noqa: E731
    config = base_config(
        dataset,
        tmp_path / "out",
        [{"name": "trained", "model": vllm(tiny_models["good"])}, {"name": "untrained", "model": vllm(tiny_models["bad"])}],
        metrics=[
            {"type": "exact_match"},
            {"type": "contains"},
            {"type": "length", "unit": "words"},
            {"type": "latency"},
            {"type": "tokens"},
            {"type": "judge"},
        ],
        judge={"model": http_target("judge", openai_server)["model"], "rubric": JUDGE_RUBRIC},
        gate={"min": {"exact_match": 0.8}, "max_failure_rate": 0.1},
        bootstrap={"samples": 500},
    )
    config_path = tmp_path / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config))

    outcome = CliRunner().invoke(app, ["evaluate", str(config_path), "--no-progress"])

    assert outcome.exit_code == 1, outcome.output  # the untrained model fails the gate, so the run fails
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["verdicts"]["trained"]["passed"] is True
    assert metrics["verdicts"]["untrained"]["passed"] is False
    trained, untrained = metrics["summaries"]["trained"], metrics["summaries"]["untrained"]
    examples = 2 * len(TOY_TASK) + 1
    assert trained["examples"] == untrained["examples"] == examples
    assert trained["failed"] == untrained["failed"] == 1  # the too-long question, counted in both
    assert trained["metrics"]["exact_match"]["mean"] == pytest.approx(2 * len(TOY_TASK) / examples)
    assert untrained["metrics"]["exact_match"]["mean"] < 0.5
    interval = trained["metrics"]["exact_match"]
    assert interval["ci_low"] <= interval["mean"] <= interval["ci_high"]
    assert set(trained["slices"]) == {"warm", "cool"}
    assert trained["metrics"]["judge"]["n"] == examples and trained["judge_errors"] == 0  # a failed answer judges 0
    assert trained["metrics"]["latency"]["mean"] > 0

    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 * examples
    (failed,) = [s for s in scores if s["target"] == "trained" and s["id"] == "too-long"]
    assert "256" in failed["error"] and failed["scores"]["exact_match"] == 0.0  # the reason is kept
    assert {p.name for p in (tmp_path / "out" / "plots").iterdir()} >= {"scores_trained.png", "slices.png"}
    assert "| trained |" in (tmp_path / "out" / "report.md").read_text()

    event = wait_for_event("rayllm.evaluation.completed", "rayllm.evaluation.colours")
    assert event.payload["passed"] is False and event.payload["verdicts"]["trained"]["passed"] is True
    assert OPENAI_SERVER_KEY not in outcome.output + json.dumps(metrics)


@pytest.mark.slow
def test_baseline_from_the_last_passing_run_and_from_a_scores_file(
    tmp_path, prefect_server, ray_session, openai_server, monkeypatch
):
    from prefect_api import artifacts_with_key

    from prefect_rayllm.flows.evaluation import evaluate
    from prefect_rayllm.tasks.evaluation import baseline_key

    monkeypatch.setenv("TINY_SERVER_KEY", OPENAI_SERVER_KEY)
    dataset = write_dataset(tmp_path / "eval.jsonl")
    common = dict(baseline={"last_run": True}, gate={"min": {"exact_match": 0.9}, "max_regression": {"exact_match": 0.05}})
    config = lambda output, **extra: EvaluationConfig.model_validate(  # noqa: E731
        {
            **base_config(dataset, tmp_path / output, [http_target("endpoint", openai_server)], name="colours-http", **common),
            **extra,
        }
    )

    first = evaluate(config("first"))
    assert first.passed and first.baseline is None and not first.verdicts["endpoint"].has_baseline
    assert artifacts_with_key(baseline_key("colours-http")), "a passing run leaves its scores as the next baseline"
    assert first.summaries["endpoint"].metrics["latency"].mean > 0  # HTTP requests are timed

    second = evaluate(config("second"))
    assert second.baseline == first.outputs["scores"]
    delta = second.deltas["endpoint"]["exact_match"]
    assert delta.paired and delta.delta == 0.0 and second.passed

    # A baseline that was better than this run: the regression check fails the gate.
    better = [
        {**json.loads(line), "scores": {"exact_match": 1.0, "latency": 0.1, "tokens": 10.0}}
        for line in (tmp_path / "first" / "scores.jsonl").read_text().splitlines()
    ]
    worse_dataset = tmp_path / "worse.jsonl"
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    rows[0]["answer"] = rows[1]["answer"] = "neither"  # two references the endpoint cannot match
    worse_dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "better.jsonl").write_text("".join(json.dumps(r) + "\n" for r in better))
    third = evaluate(
        EvaluationConfig.model_validate(
            {
                **base_config(worse_dataset, tmp_path / "third", [http_target("endpoint", openai_server)], name="colours-http"),
                "baseline": {"scores": str(tmp_path / "better.jsonl")},
                "gate": {"max_regression": {"exact_match": 0.05}, "fail_flow": False},
            }
        )
    )
    assert not third.passed
    (check,) = third.verdicts["endpoint"].checks
    assert check.kind == "max_regression" and not check.passed
