"""Job kinds: told from a file's keys, and every kind's input checked before any runtime starts."""

import json
from pathlib import Path

import pytest
from conftest import REPO, openai_line

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.jobs.kinds import KINDS, check_job, config_model, detect_kind, load_job_config, local_model_path

EXAMPLE_KINDS = {"batch": "batch", "chain": "chain", "eval": "evaluation", "curate": "curation", "rollout": "rollout"}


def test_every_example_is_told_apart_by_its_keys() -> None:
    paths = sorted((REPO / "examples").glob("*.yaml"))
    assert {p.name.split("-")[0] for p in paths} == set(EXAMPLE_KINDS)
    for path in paths:
        kind, config = load_job_config(path)
        assert kind == EXAMPLE_KINDS[path.name.split("-")[0]], path.name
        assert isinstance(config, config_model(kind))


def test_a_file_that_fits_no_kind_or_two_asks_for_the_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot tell the job kind from its keys \(colour\); give it with --kind"):
        detect_kind({"colour": "red"})
    with pytest.raises(ConfigError, match=r"give it with --kind \(batch, curation\)"):
        detect_kind({"output": "o/", "model": {"source": "m"}})
    path = tmp_path / "job.yaml"
    path.write_text("output: o/\nmodel: {source: ./m}\n")
    with pytest.raises(ConfigError, match="input: Field required"):
        load_job_config(path, "batch")  # the kind given: its own errors, each key named
    with pytest.raises(ConfigError, match="source: Field required"):
        load_job_config(path, "curation")
    with pytest.raises(ConfigError, match="unknown job kind 'eval'"):
        load_job_config(path, "eval")
    assert KINDS == ("batch", "chain", "evaluation", "curation", "rollout")


def test_a_typo_still_finds_the_kind_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text("input: t.jsonl\noutput: o/\nsteps:\n  - {name: a, model: {source: m}, prompt: {user: x}, output_colum: y}\n")
    with pytest.raises(ConfigError) as error:
        load_job_config(path)
    assert "line 4: steps.0.output_colum: unknown key (did you mean 'output_column'?)" in str(error.value)


def _batch(tmp_path: Path, lines: list[str] | None, **extra) -> object:
    path = tmp_path / "requests.jsonl"
    if lines is not None:
        path.write_text("".join(line + "\n" for line in lines))
    _, config = load_job_config(
        _yaml(tmp_path, {"input": str(path), "output": str(tmp_path / "out"), "model": {"source": "m"}, **extra})
    )
    return config


def _yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def test_batch_input_checks_name_the_path(tmp_path: Path) -> None:
    missing = _batch(tmp_path, None)
    with pytest.raises(ConfigError, match=f"input: {tmp_path}/requests.jsonl does not exist"):
        check_job("batch", missing)
    with pytest.raises(ConfigError, match="requests.jsonl is empty"):
        check_job("batch", _batch(tmp_path, ["", "  "]))
    with pytest.raises(ConfigError, match=r"is not OpenAI Batch JSONL: none of its first 2 line\(s\) is a request"):
        check_job("batch", _batch(tmp_path, ['{"text": "a table row"}', "not json"]))
    (tmp_path / "requests.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    with pytest.raises(ConfigError, match="requests.jsonl is not UTF-8 text"):
        check_job("batch", _batch(tmp_path, None))


def test_malformed_lines_among_requests_are_row_errors_not_a_refusal(tmp_path: Path) -> None:
    lines = ['{"custom_id": "broken", "body": ', openai_line("a", "Is red warm or cool?"), "[1, 2]"]
    assert check_job("batch", _batch(tmp_path, lines), count=True) == f"{tmp_path}/requests.jsonl is openai_batch with 3 rows"


def test_a_parquet_input_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    path.write_text('{"text": "x"}\n')
    _, config = load_job_config(
        _yaml(tmp_path, {"input": str(path), "output": "o/", "model": {"source": "m"}, "prompt": {"user": "{{ text }}"}})
    )
    with pytest.raises(ConfigError, match=r"table.parquet cannot be read: ArrowInvalid"):
        check_job("batch", config)


def test_local_model_folders_are_checked_on_a_local_ray_only(tmp_path: Path) -> None:
    config = _batch(tmp_path, [openai_line("a", "hi")], model={"source": str(tmp_path / "models" / "tiny")})
    with pytest.raises(ConfigError, match=f"model.source: {tmp_path}/models/tiny does not exist"):
        check_job("batch", config)
    remote = _batch(tmp_path, [openai_line("a", "hi")], model={"source": "/models/tiny"}, ray_address="ray://head:10001")
    assert "openai_batch" in check_job("batch", remote)  # the path names the cluster's filesystem
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert "openai_batch" in check_job("batch", config)


@pytest.mark.parametrize(
    "source, path",
    [
        ("./models/tiny", "models/tiny"),
        ("/models/tiny", "/models/tiny"),
        ("file:///models/tiny", "/models/tiny"),
        ("meta-llama/Llama-3.1-8B-Instruct", None),
        ("s3://bucket/model", None),
        ("tiny-chat", None),
    ],
)
def test_local_model_path(source: str, path: str | None) -> None:
    assert local_model_path(source) == (None if path is None else Path(path))


def test_chain_checks_the_table_and_every_steps_fields(tmp_path: Path) -> None:
    table = tmp_path / "t.jsonl"
    step = {"name": "a", "model": {"source": "m"}, "prompt": {"user": "{{ colur }}"}, "output_column": "y"}
    data = {"input": str(table), "output": "o/", "steps": [step]}
    _, config = load_job_config(_yaml(tmp_path, data))
    with pytest.raises(ConfigError, match=f"input: {table} does not exist"):
        check_job("chain", config)
    table.write_text('{"colour": "red"}\n')
    with pytest.raises(ConfigError, match=r"steps\[0\] \(a\).prompt.user uses field 'colur'"):
        check_job("chain", config)


def test_evaluation_checks_dataset_and_baseline(tmp_path: Path) -> None:
    dataset = tmp_path / "eval.jsonl"
    data = {
        "name": "e",
        "dataset": {"path": str(dataset)},
        "output": "o/",
        "targets": [{"name": "t", "model": {"source": "m"}}],
        "metrics": [{"type": "exact_match"}],
        "baseline": {"scores": str(tmp_path / "old" / "scores.jsonl")},
    }
    _, config = load_job_config(_yaml(tmp_path, data))
    with pytest.raises(ConfigError, match=f"dataset.path: {dataset} does not exist"):
        check_job("evaluation", config)
    dataset.write_text('{"input": "Is red warm or cool?", "reference": "warm"}\n')
    with pytest.raises(ConfigError, match=f"baseline.scores: {tmp_path}/old/scores.jsonl does not exist"):
        check_job("evaluation", config)


def test_curation_checks_the_source(tmp_path: Path) -> None:
    images = tmp_path / "images"
    data = {"source": {"url": str(images), "include": ["*.png"]}, "output": "o/", "model": {"source": "m"}}
    _, config = load_job_config(_yaml(tmp_path, data))
    with pytest.raises(ConfigError, match=f"source.url: {images} does not exist"):
        check_job("curation", config)
    images.mkdir()
    (images / "a.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"holds no image matching include \['\*.png'\]"):
        check_job("curation", config)
    (images / "b.png").write_bytes(b"png")
    assert check_job("curation", config, count=True).startswith(f"{images} with 1 images")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"uri": "s3://b/x.png"}\n{"url": "typo"}\n')
    _, config = load_job_config(_yaml(tmp_path, {**data, "source": {"manifest": str(manifest)}}))
    with pytest.raises(ConfigError, match="manifest.jsonl line 2: no string 'uri' field"):
        check_job("curation", config)


def test_rollout_checks_its_evaluation_dataset_and_candidate(tmp_path: Path) -> None:
    data = {
        "endpoint": "colours",
        "model_id": "colours",
        "candidate": {"source": str(tmp_path / "models" / "tiny")},
        "smoke": [{"prompt": "Is red warm or cool?"}],
        "evaluation": {
            "name": "e",
            "dataset": {"path": str(tmp_path / "eval.jsonl")},
            "output": str(tmp_path / "evals"),
            "metrics": [{"type": "exact_match"}],
        },
    }
    _, config = load_job_config(_yaml(tmp_path, data))
    with pytest.raises(ConfigError, match=f"evaluation.dataset.path: {tmp_path}/eval.jsonl does not exist"):
        check_job("rollout", config)
    (tmp_path / "eval.jsonl").write_text('{"input": "Is red warm or cool?", "reference": "warm"}\n')
    with pytest.raises(ConfigError, match=f"candidate.source: {tmp_path}/models/tiny does not exist"):
        check_job("rollout", config)


def test_an_output_holding_a_run_with_other_settings_is_refused_before_any_runtime(tmp_path: Path) -> None:
    from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob
    from prefect_rayllm.rayllm_stages.jobs.kinds import check_resume
    from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused

    earlier = _batch(tmp_path, [openai_line("a", "Is red warm or cool?")], sampling={"max_tokens": 8})
    BatchJob(earlier).prepare()  # the earlier run's record in the output (no engine needed)
    check_resume("batch", earlier)  # the same settings resume
    now = _batch(tmp_path, [openai_line("a", "Is red warm or cool?")], sampling={"max_tokens": 16})
    with pytest.raises(ResumeRefused, match=r"holds a batch run with other settings \(.*max_tokens.*\); rerun with overwrite"):
        check_resume("batch", now)
    check_resume("batch", now, overwrite=True)


def test_an_evaluation_checks_each_targets_answers(tmp_path: Path) -> None:
    from prefect_rayllm.rayllm_stages.evaluation.run import answer_chain_config
    from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
    from prefect_rayllm.rayllm_stages.jobs.kinds import check_resume
    from prefect_rayllm.rayllm_stages.jobs.lifecycle import ResumeRefused

    dataset = tmp_path / "eval.jsonl"
    dataset.write_text('{"input": "Is red warm or cool?", "reference": "warm"}\n')
    data = {
        "name": "e",
        "dataset": {"path": str(dataset)},
        "output": str(tmp_path / "evals"),
        "targets": [{"name": "t", "model": {"source": "m"}}],
        "metrics": [{"type": "exact_match"}],
    }
    _, earlier = load_job_config(_yaml(tmp_path, data))
    ChainJob(answer_chain_config(earlier, earlier.targets[0])).prepare()
    _, now = load_job_config(_yaml(tmp_path, {**data, "sampling": {"max_tokens": 3}}))
    with pytest.raises(ResumeRefused, match="targets/t/answers holds a chain run with other settings"):
        check_resume("evaluation", now)


def test_a_new_evaluation_with_a_judge_is_not_refused_before_its_answers_exist(tmp_path: Path) -> None:
    """The judge chain reads the answers file, which the run writes: a new output checks nothing of it."""
    from prefect_rayllm.rayllm_stages.jobs.kinds import check_resume

    dataset = tmp_path / "eval.jsonl"
    dataset.write_text('{"input": "Is red warm or cool?", "reference": "warm"}\n')
    data = {
        "name": "e",
        "dataset": {"path": str(dataset)},
        "output": str(tmp_path / "evals"),
        "targets": [{"name": "t", "model": {"source": "m"}}],
        "metrics": [{"type": "judge"}],
        "judge": {"model": {"source": "j"}, "rubric": {"user": "{{ input }} {{ prediction }} Score 1-5."}},
    }
    _, config = load_job_config(_yaml(tmp_path, data))
    check_resume("evaluation", config)
    assert not (tmp_path / "evals").exists()
