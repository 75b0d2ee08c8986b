"""Engine capacity and batch sizing (rayllm_stages.llm.capacity): known shapes, cards and plans."""

from __future__ import annotations

import json

import pytest

from prefect_rayllm.rayllm_stages.llm.capacity import (
    GPU_STAGE_CONCURRENCY,
    Accelerator,
    EngineCapacity,
    ModelShape,
    accelerator_from_name,
    card_specs,
    estimate_kv_tokens,
    plan_batches,
    size_vllm_options,
    vllm_offline_defaults,
)

LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
H200 = Accelerator("NVIDIA H200", 141e9, 4.8e12)


def test_llama_8b_shape_counts_its_published_parameters_and_kv_bytes():
    shape = ModelShape.from_config(LLAMA_31_8B)
    assert shape is not None
    assert shape.params == 8_030_261_248  # Llama-3.1-8B's published count
    assert shape.weight_bytes == 2 * 8_030_261_248
    assert shape.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16


def test_shape_reads_dtype_overrides_and_refuses_what_it_cannot_count():
    fp8_kv = ModelShape.from_config(LLAMA_31_8B, {"kv_cache_dtype": "fp8"})
    assert fp8_kv is not None and fp8_kv.kv_bytes_per_token == 2 * 32 * 8 * 128
    fp32 = ModelShape.from_config(LLAMA_31_8B, {"dtype": "float32"})
    assert fp32 is not None and fp32.weight_bytes_per_param == 4
    assert ModelShape.from_config({**LLAMA_31_8B, "num_local_experts": 8}) is None
    assert ModelShape.from_config({"hidden_size": 8}) is None
    vlm = ModelShape.from_config({"architectures": ["X"], "text_config": LLAMA_31_8B})
    assert vlm is not None and vlm.num_layers == 32


@pytest.mark.parametrize(
    ("name", "bandwidth"),
    [
        ("NVIDIA H200", 4.8e12),
        ("H200", 4.8e12),
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H100 NVL", 3.9e12),
        ("NVIDIA A100-SXM4-80GB", 2.039e12),
        ("A100-40G", 1.555e12),
        ("NVIDIA L4", 0.3e12),
        ("NVIDIA L40S", 0.864e12),
    ],
)
def test_card_bandwidth_by_name(name, bandwidth):
    specs = card_specs(name)
    assert specs is not None and specs[1] == bandwidth


def test_unknown_card_has_no_specs_but_keeps_measured_memory():
    assert card_specs("Mystery GPU 9000") is None
    card = accelerator_from_name("Mystery GPU 9000", memory_bytes=64e9)
    assert card.memory_bytes == 64e9 and card.bandwidth_bytes_per_s is None


def test_vllm_offline_defaults_follow_vllms_table():
    assert vllm_offline_defaults(H200) == {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}
    assert vllm_offline_defaults(accelerator_from_name("NVIDIA H100 80GB HBM3", memory_bytes=85e9))["max_num_seqs"] == 1024
    assert vllm_offline_defaults(accelerator_from_name("NVIDIA A100-SXM4-80GB", memory_bytes=85e9))["max_num_seqs"] == 256
    assert vllm_offline_defaults(accelerator_from_name("NVIDIA L4"))["max_num_batched_tokens"] == 8192


def test_kv_estimate_on_an_h200():
    shape = ModelShape.from_config(LLAMA_31_8B)
    assert shape is not None
    tokens = estimate_kv_tokens(shape, H200, {"gpu_memory_utilization": 0.85})
    # 141 GB x 0.85 - 4 GiB reserve - 16.06 GB of weights, at 128 KiB per token
    expected = (141e9 * 0.85 - 4 * 1024**3 - shape.weight_bytes) // shape.kv_bytes_per_token
    assert tokens == int(expected) and 750_000 < tokens < 770_000
    assert estimate_kv_tokens(shape, H200, {"kv_cache_memory_bytes": 131072 * 1000}) == 1000


def test_capacity_is_the_smaller_of_max_num_seqs_and_what_the_kv_cache_holds():
    assert EngineCapacity(max_num_seqs=1024).concurrency == 1024
    assert EngineCapacity(max_num_seqs=128, pipeline_parallel=2).concurrency == 256
    kv_bound = EngineCapacity(max_num_seqs=1024, kv_tokens=100_000, tokens_per_request=500)
    assert kv_bound.kv_requests == 200 and kv_bound.concurrency == 200


def test_plan_holds_twice_the_engines_concurrency_in_flight():
    plan = plan_batches(1024)
    assert (plan.batch_size, plan.max_concurrent_batches, plan.rows_in_flight) == (128, 16, 2048)
    small = plan_batches(128)
    assert (small.batch_size, small.max_concurrent_batches, small.rows_in_flight) == (16, 16, 256)
    tiny = plan_batches(4)
    assert tiny.batch_size == 16 and tiny.max_concurrent_batches == 2


def test_plan_keeps_user_knobs_and_sizes_the_other():
    plan = plan_batches(1024, batch_size=64)
    assert (plan.batch_size, plan.max_concurrent_batches) == (64, 32)
    fixed = plan_batches(1024, batch_size=32, max_concurrent_batches=4)
    assert fixed.rows_in_flight == 128
    assert any("cannot fill" in note for note in fixed.notes)
    with pytest.raises(ValueError):
        plan_batches(0)


def _options(model_dir, **extra):
    stage = {"num_cpus": 0.25}
    return {
        "model_source": str(model_dir),
        "engine_kwargs": {"max_model_len": 1024, "gpu_memory_utilization": 0.85},
        "batch_size": 32,
        "chat_template_stage": dict(stage),
        "tokenize_stage": dict(stage),
        "detokenize_stage": dict(stage),
        **extra,
    }


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return tmp_path


def test_cpu_options_are_unchanged(model_dir):
    options = _options(model_dir)
    sized, plan = size_vllm_options(options, gpu=False, user_keys=set(), accelerator=H200)
    assert sized == options and plan is None


def test_gpu_options_get_vllms_engine_defaults_and_sized_batches(model_dir):
    sized, plan = size_vllm_options(_options(model_dir), gpu=True, user_keys=set(), accelerator=H200)
    assert sized["engine_kwargs"] == {
        "max_model_len": 1024,
        "gpu_memory_utilization": 0.85,
        "max_num_seqs": 1024,
        "max_num_batched_tokens": 16384,
    }
    assert (sized["batch_size"], sized["max_concurrent_batches"]) == (128, 16)
    assert sized["tokenize_stage"] == {"num_cpus": 0.25, "concurrency": GPU_STAGE_CONCURRENCY}
    # vLLM's queue holds the next wave (Ray's default lets in only 1.1 x max_num_seqs)
    assert plan is not None and plan["concurrency"] == 1024
    assert sized["max_pending_requests"] == plan["max_pending_requests"] == 2048 and plan["kv_tokens_estimate"] > 700_000
    assert plan["engine_defaults_added"] == {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}


def test_gpu_options_keep_what_the_user_set(model_dir):
    options = _options(model_dir, max_concurrent_batches=4)
    options["engine_kwargs"]["max_num_seqs"] = 256
    options["batch_size"] = 64
    options["tokenize_stage"] = {"concurrency": 3}
    sized, plan = size_vllm_options(
        options, gpu=True, user_keys={"batch_size", "max_concurrent_batches", "tokenize_stage"}, accelerator=H200
    )
    assert sized["engine_kwargs"]["max_num_seqs"] == 256
    assert sized["engine_kwargs"]["max_num_batched_tokens"] == 16384
    assert (sized["batch_size"], sized["max_concurrent_batches"]) == (64, 4)
    assert sized["tokenize_stage"] == {"concurrency": 3}
    assert plan is not None and plan["concurrency"] == 256


def test_gpu_sizing_leaves_disabled_stages_and_the_users_pending_limit(model_dir):
    options = {**_options(model_dir), "chat_template_stage": {"enabled": False}, "max_pending_requests": 300}
    sized, _ = size_vllm_options(options, gpu=True, user_keys={"max_pending_requests"}, accelerator=H200)
    assert sized["chat_template_stage"] == {"enabled": False} and sized["max_pending_requests"] == 300


def test_default_batch_size_is_not_a_user_choice(model_dir):
    """ModelSpec's default batch_size (32) is sized on GPUs; only a batch_size the user wrote is kept."""
    sized, _ = size_vllm_options(_options(model_dir), gpu=True, user_keys=set(), accelerator=H200)
    assert sized["batch_size"] == 128
