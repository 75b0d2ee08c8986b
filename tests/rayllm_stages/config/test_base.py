"""What every config loader shares: YAML errors with file, line and column; bad keys with their line
and the closest valid key; the job fields declared once (`JobConfig` and its subclasses)."""

from pathlib import Path

import pytest
from conftest import REPO

from prefect_rayllm.rayllm_stages.config.base import (
    ConfigError,
    JobConfig,
    OutputJobConfig,
    RowJobConfig,
    load_config,
    valid_keys,
    validate_config,
)
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig, ChainJobConfig
from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input: in.jsonl\noutput: out/\nmodel:\n  source: ./m\n  batch_size: [8\nsampling: {}\n")
    with pytest.raises(ConfigError) as error:
        load_config(BatchJobConfig, path)
    message = str(error.value)
    assert message.startswith(f"{path} is not valid YAML: line 6, column 9: expected ',' or ']'")
    assert "started at line 5, column 15" in message


def test_bad_indentation_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input: in.jsonl\noutput: out/\n  model: x\n")
    with pytest.raises(ConfigError, match=r"job.yaml is not valid YAML: line 3, column 8: mapping values are not allowed here"):
        load_config(BatchJobConfig, path)


def test_unknown_keys_name_their_line_and_the_closest_valid_key(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(
        "name: colours\n"
        "dataset: {path: d.jsonl, id_feild: qid}\n"
        "output: out/\n"
        "targets:\n"
        "  - {name: t, model: {source: ./m, engin: vllm}}\n"
        "metrics:\n"
        "  - {type: exact_match}\n"
        "  - type: regex\n"
        "    patern: '^x$'\n"
        "gate: {min: {exact_match: 0.8}, fail_flwo: true}\n"
        "ray_adress: auto\n"
        "colour: red\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(EvaluationConfig, path)
    assert str(error.value).splitlines() == [
        f"{path} is invalid:",
        "  line 2: dataset.id_feild: unknown key (did you mean 'id_field'?)",
        "  line 5: targets.0.model.engin: unknown key (did you mean 'engine'?)",
        "  line 9: metrics.1.patern: unknown key (did you mean 'pattern'?)",  # the union's tag is not shown
        "  line 10: gate.fail_flwo: unknown key (did you mean 'fail_flow'?)",
        "  line 11: ray_adress: unknown key (did you mean 'ray_address'?)",
        "  line 12: colour: unknown key",  # nothing close
    ]


def test_value_errors_read_plainly() -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(BatchJobConfig, {"input": "i", "output": "o", "model": {"source": "m", "concurrency": "a"}})
    assert "model.concurrency: Input should be a valid integer" in str(error.value)
    assert "concurrency.int" not in str(error.value)  # pydantic's names of union members are no keys
    with pytest.raises(ConfigError) as error:
        validate_config(BatchJobConfig, {"input": "i", "output": "o", "model": {"source": "m", "engine": "http"}})
    assert "model: engine 'http' needs base_url" in str(error.value) and "Value error" not in str(error.value)


def test_a_rollouts_evaluation_names_its_bad_keys() -> None:
    data = {
        "endpoint": "colours",
        "model_id": "colours",
        "candidate": {"source": "/m"},
        "smoke": [{"prompt": "Is red warm or cool?"}],
        "evaluation": {"name": "c", "dataset": {"pth": "d.jsonl"}, "output": "o/", "metrics": [{"type": "exact_match"}]},
    }
    with pytest.raises(
        ConfigError,
        match=r"evaluation is invalid: dataset.path: Field required; dataset.pth: unknown key \(did you mean 'path'\?\)",
    ):
        validate_config(RolloutConfig, data)


def test_valid_keys_follow_lists_unions_and_tags() -> None:
    assert "engine" in valid_keys(EvaluationConfig, ("targets", 0, "model"))
    assert "pattern" in valid_keys(EvaluationConfig, ("metrics", 0, "regex"))
    assert "schema" in valid_keys(EvaluationConfig, ("metrics", 0, "json_schema"))  # an alias counts
    assert valid_keys(BatchJobConfig, ("model", "engine_kwargs")) == []  # a free mapping


@pytest.mark.parametrize(
    "model, base",
    [
        (BatchJobConfig, RowJobConfig),
        (ChainJobConfig, RowJobConfig),
        (EvaluationConfig, OutputJobConfig),
        (CurationConfig, OutputJobConfig),
        (RolloutConfig, JobConfig),
    ],
)
def test_every_job_config_shares_the_job_fields(model, base) -> None:
    assert issubclass(model, base)
    for name, field in base.model_fields.items():
        assert name in model.model_fields, name
        if name != "commit_every_rows":  # curation commits images, 256 at a time
            assert model.model_fields[name].default == field.default or field.is_required()
    properties = list(model.model_json_schema()["properties"])
    assert properties[-2:] == ["ray_address", "ray_block"]  # the shared fields come after the job's own in the UI's form
    if "input" in properties:
        assert properties[:2] == ["input", "output"]


def test_every_example_still_loads_with_the_shared_fields() -> None:
    models = {"batch": BatchJobConfig, "chain": ChainJobConfig, "eval": EvaluationConfig, "curate": CurationConfig}
    models["rollout"] = RolloutConfig
    paths = sorted((REPO / "examples").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        config = load_config(models[path.name.split("-")[0]], path)
        assert config.ray_address is None, path.name
