"""The evaluation config says what its validators accept: a judge rubric may read `reference`."""

import json
from pathlib import Path

import pytest

from prefect_rayllm.rayllm_stages.config.base import ConfigError, validate_config
from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig, JudgeConfig
from prefect_rayllm.rayllm_stages.evaluation.run import check_evaluation, judge_chain_config
from prefect_rayllm.rayllm_stages.llm.prompts import render_messages

RUBRIC = {"system": "Grade strictly.", "user": "Q: {{ question }} Expected: {{ reference }} Reply: {{ prediction }}"}


def _config(dataset: Path, reference_field: str | None = "answer", rubric: dict | None = None) -> dict:
    return {
        "name": "colours",
        "dataset": {"path": str(dataset), "id_field": "qid", "input_field": "question", "reference_field": reference_field},
        "output": str(dataset.parent / "out"),
        "targets": [{"name": "t", "model": {"source": "m", "engine": "http", "base_url": "http://127.0.0.1:1/v1"}}],
        "prompt": {"user": "{{ question }}"},
        "metrics": [{"type": "judge"}],
        "judge": {"model": {"source": "j", "engine": "http", "base_url": "http://127.0.0.1:1/v1"}, "rubric": rubric or RUBRIC},
    }


def _dataset(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_rubric_description_and_the_validator_agree(tmp_path: Path) -> None:
    described = JudgeConfig.model_fields["rubric"].description or ""
    assert "`prediction`" in described and "`reference`" in described
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "Is red warm or cool?", "answer": "warm"}])
    config = validate_config(EvaluationConfig, _config(dataset))
    assert check_evaluation(config) == 1  # before: "judge.rubric.user uses 'reference', which is neither ..."


def test_the_judge_reads_reference_as_the_reference_fields_value(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "Is red warm or cool?", "answer": "warm"}])
    config = validate_config(EvaluationConfig, _config(dataset))
    chain = judge_chain_config(config, config.targets[0])
    assert chain is not None
    # a row of the target's answers file: the dataset's columns and the prediction
    answers_row = {"qid": "q1", "question": "Is red warm or cool?", "answer": "warm", "prediction": "cool"}
    messages = render_messages(chain.steps[0].prompt, answers_row)
    assert messages == [
        {"role": "system", "content": "Grade strictly."},  # no reference here: left as written
        {"role": "user", "content": "Q: Is red warm or cool? Expected: warm Reply: cool"},
    ]


def test_a_dataset_column_named_reference_needs_no_binding(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "q", "reference": "warm"}])
    config = validate_config(EvaluationConfig, _config(dataset, reference_field="reference"))
    chain = judge_chain_config(config, config.targets[0])
    assert chain is not None and chain.steps[0].prompt.user == RUBRIC["user"]
    assert check_evaluation(config) == 1


def test_reference_without_a_reference_field_is_refused_with_the_key_named(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "q", "answer": "warm"}])
    with pytest.raises(ConfigError, match="judge.rubric uses 'reference', but dataset.reference_field is null"):
        validate_config(EvaluationConfig, _config(dataset, reference_field=None))


def test_reference_field_missing_from_the_dataset_is_refused_before_any_engine(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "q", "gold": "warm"}])
    config = validate_config(EvaluationConfig, _config(dataset))
    with pytest.raises(ConfigError, match=r"judge.rubric.user uses 'reference', but .*eval.jsonl has no column 'answer'"):
        check_evaluation(config)


def test_other_unknown_rubric_fields_are_still_refused(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, [{"qid": "q1", "question": "q", "answer": "warm"}])
    config = validate_config(EvaluationConfig, _config(dataset, rubric={"user": "{{ questoin }} {{ prediction }}"}))
    with pytest.raises(ConfigError, match="judge.rubric.user uses 'questoin', which is neither a dataset column"):
        check_evaluation(config)
