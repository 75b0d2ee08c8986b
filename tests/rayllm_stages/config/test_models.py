import pytest

from prefect_rayllm.rayllm_stages.config.base import ConfigError, load_config, validate_config
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig

BASE = {"input": "in.jsonl", "output": "out/", "model": {"source": "./m"}}


def test_yaml_shape_from_the_issue_loads(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://bucket/requests.jsonl\n"
        "output: s3://bucket/run-1/\n"
        "model:\n  source: ./models/tiny\n  engine: vllm\n  engine_kwargs: {max_model_len: 256}\n"
        "  concurrency: 1\n  batch_size: 32\n"
        "sampling: {temperature: 0.0, max_tokens: 16}\n"
        "max_error_rate: 0.05\n"
    )
    config = load_config(BatchJobConfig, path)
    assert config.model.engine_kwargs == {"max_model_len": 256}
    assert config.sampling.max_tokens == 16
    assert config.model.served_name == "tiny"


@pytest.mark.parametrize(
    "patch, named",
    [
        ({"modle": {}}, "modle: unknown key"),
        ({"model": {"source": "./m", "engin": "vllm"}}, "model.engin: unknown key"),
        ({"sampling": {"temperature": 5}}, "sampling.temperature"),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"sampling": {"top_k": 0}}, "sampling.top_k"),
        ({"model": {"source": "./m", "concurrency": 0}}, "model.concurrency"),
        ({"model": {"source": "m", "engine": "http"}}, "base_url"),
        ({"model": {"source": "./m", "base_url": "http://x"}}, "base_url is only for engine 'http'"),
        ({"max_error_rate": 2}, "max_error_rate"),
        ({"input_format": "parquet"}, "needs a prompt template"),
    ],
)
def test_bad_configs_name_the_key(patch, named):
    with pytest.raises(ConfigError) as error:
        validate_config(BatchJobConfig, {**BASE, **patch})
    assert named in str(error.value)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(BatchJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(BatchJobConfig, bad)


def test_processor_kwargs_pass_through_to_ray():
    from prefect_rayllm.rayllm_stages.llm.engines import vllm_processor_config

    config = validate_config(
        BatchJobConfig,
        {
            **BASE,
            "model": {
                "source": "./m",
                "engine_kwargs": {"max_model_len": 128},
                "processor_kwargs": {"max_concurrent_batches": 3},
            },
        },
    )
    ray_config = vllm_processor_config(config.model, gpu=False)
    assert ray_config.max_concurrent_batches == 3
    assert ray_config.engine_kwargs["max_model_len"] == 128
    assert ray_config.engine_kwargs["gpu_memory_utilization"] == 0.1  # CPU default
    assert [dict(b) for b in ray_config.placement_group_config["bundles"]] == [{"CPU": 1.0, "GPU": 0.0}]
    assert ray_config.should_continue_on_error is True
    on_gpu = vllm_processor_config(config.model, gpu=True)
    assert on_gpu.placement_group_config is None
    assert "gpu_memory_utilization" not in on_gpu.engine_kwargs


def test_unknown_processor_kwarg_is_rejected_by_ray():
    from pydantic import ValidationError

    from prefect_rayllm.rayllm_stages.llm.engines import vllm_processor_config

    config = validate_config(
        BatchJobConfig, {**BASE, "model": {"source": "./m", "processor_kwargs": {"apply_chat_template": True}}}
    )
    with pytest.raises(ValidationError, match="apply_chat_template"):
        vllm_processor_config(config.model, gpu=False)


def test_example_configs_are_valid():
    from conftest import REPO

    from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
    from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig

    kinds = {"batch": BatchJobConfig, "chain": ChainJobConfig, "eval": EvaluationConfig}
    paths = sorted((REPO / "examples").glob("*.yaml"))
    if any(p.name.startswith("rollout-") for p in paths):
        from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig

        kinds["rollout"] = RolloutConfig
    if any(p.name.startswith("curate-") for p in paths):
        from prefect_rayllm.rayllm_stages.curation.config import CurationConfig

        kinds["curate"] = CurationConfig
    assert {p.name.split("-")[0] for p in paths} == set(kinds), paths
    for path in paths:
        assert load_config(kinds[path.name.split("-")[0]], path), path


def test_a_rollouts_evaluation_reaches_ray_as_the_rollout_does():
    from conftest import REPO

    from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig

    rollout = load_config(RolloutConfig, REPO / "examples" / "rollout-cpu.yaml")
    through_block = rollout.model_copy(update={"ray_address": None, "ray_block": "gpu-cluster"})
    evaluation = through_block.evaluation_config("http://127.0.0.1:8000/v1", "v2")
    assert evaluation is not None and evaluation.ray_block == "gpu-cluster" and evaluation.ray_address is None
    through_address = rollout.model_copy(update={"ray_address": "ray://head:10001", "ray_block": None})
    assert through_address.evaluation_config("http://127.0.0.1:8000/v1", "v2").ray_address == "ray://head:10001"
