"""Engine fullness and the decode roofline (rayllm_stages.runtime.engine_stats), with known numbers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_rayllm.rayllm_stages.llm.capacity import Accelerator, ModelShape
from prefect_rayllm.rayllm_stages.runtime.engine_stats import (
    EngineTrace,
    EngineTraces,
    _Buckets,
    decode_roofline,
    efficiency,
    efficiency_line,
    engine_timing,
    with_engine_timing,
)

LLAMA_8B = ModelShape(
    num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256
)
H200 = Accelerator("NVIDIA H200", 141e9, 4.8e12)


def test_roofline_of_an_8b_model_on_an_h200():
    roofline = decode_roofline(LLAMA_8B, H200, running=128, context_tokens=300)
    assert roofline is not None
    weights = 16_060_522_496  # 8,030,261,248 bf16 parameters
    kv = 128 * 300 * 131_072  # 128 requests x 300 tokens x 128 KiB
    step_s = (weights + kv) / 4.8e12  # 4.39 ms
    assert roofline["weights_gb"] == pytest.approx(16.06, abs=0.01)
    assert roofline["kv_gb_per_step"] == pytest.approx(kv / 1e9, abs=1e-3)
    assert roofline["step_ms"] == pytest.approx(step_s * 1e3, abs=1e-3)
    assert roofline["tokens_per_s"] == pytest.approx(128 / step_s, abs=0.1)  # about 29,128 tokens/s
    assert 29_000 < roofline["tokens_per_s"] < 29_200


def test_roofline_with_tensor_parallel_and_replicas():
    one = decode_roofline(LLAMA_8B, H200, running=64, context_tokens=300)
    tp2 = decode_roofline(LLAMA_8B, H200, running=64, context_tokens=300, gpus_per_replica=2)
    two = decode_roofline(LLAMA_8B, H200, running=128, context_tokens=300, replicas=2)
    assert one and tp2 and two
    assert tp2["tokens_per_s"] == pytest.approx(2 * one["tokens_per_s"], rel=1e-6)  # twice the bandwidth per step
    assert two["tokens_per_s"] == pytest.approx(2 * one["tokens_per_s"], rel=1e-6)  # two replicas of 64 each
    assert two["gpus"] == 2
    assert decode_roofline(LLAMA_8B, Accelerator("unknown", None, None), running=1, context_tokens=1) is None


def test_efficiency_is_achieved_over_ceiling():
    assert efficiency({"decode_tokens_per_s": 7282.0}, {"tokens_per_s": 29128.0}) == 0.25
    assert efficiency({"decode_tokens_per_s": 1.0}, None) is None


def test_buckets_integrate_exactly():
    buckets = _Buckets(0.5)
    buckets.add(0.25, 1.75, 2.0)
    assert buckets.averages(0, 3) == pytest.approx([1.0, 2.0, 2.0, 1.0])
    buckets.add(0.6, 0.9, 1.0)  # inside one bucket
    assert buckets.averages(1, 1) == pytest.approx([2.6])


def test_trace_of_a_full_engine():
    """100 requests run together for 10 s, 100 tokens each: 100 running, 1,000 decode tokens/s."""
    trace = EngineTrace()
    for _ in range(100):
        trace.add(
            arrival=1000.0,
            wait_s=0.0,
            prefill_s=0.0,
            decode_s=10.0,
            prompt_tokens=200,
            output_tokens=100,
            max_num_seqs=128,
            kv_tokens=100_000,
        )
    summary = trace.summary()
    assert summary["requests"] == 100 and summary["tokens_out"] == 10_000
    assert summary["decode_tokens_per_s"] == pytest.approx(1000.0, rel=1e-3)
    assert summary["steady_window_s"] == pytest.approx([1.0, 9.0], abs=0.01)
    assert summary["running"] == {"mean": 100.0, "max": 100.0, "max_num_seqs": 128}
    assert summary["kv_cache"]["tokens_mean"] == 100 * 250  # prompt plus half the output
    assert summary["kv_cache"]["use_mean"] == 0.25 and summary["kv_cache"]["capacity_source"] == "engine"
    assert summary["context_tokens_mean"] == 250
    assert max(summary["series"]["running"]) == 100


def test_trace_sees_a_starved_engine_and_waiting_requests():
    """Requests arrive one per second and each runs 2 s: two running; then a burst that waits."""
    trace = EngineTrace()
    for second in range(20):
        trace.add(arrival=second, wait_s=0.0, prefill_s=0.0, decode_s=2.0, prompt_tokens=10, output_tokens=20)
    for _ in range(10):
        trace.add(arrival=30.0, wait_s=4.0, prefill_s=0.0, decode_s=1.0, prompt_tokens=10, output_tokens=20)
    summary = trace.summary(kv_capacity_estimate=1000)
    assert summary["waiting"]["max"] == 10
    assert summary["running"]["max"] == 10
    assert 1 < summary["running"]["mean"] < 4  # two running, then a gap while the burst waits
    assert summary["kv_cache"]["capacity_source"] == "estimate"


def test_engine_timing_from_vllm_metrics():
    metrics = {
        "arrival_time": 1_700_000_000.0,
        "queued_ts": 50.0,
        "scheduled_ts": 50.5,
        "first_token_ts": 50.7,
        "last_token_ts": 52.7,
        "num_generation_tokens": 64,
        "rayllm_max_num_seqs": 1024.0,
        "rayllm_kv_tokens": 750_000.0,
    }
    timing = engine_timing(metrics)
    assert timing == {
        "arrival": 1_700_000_000.0,
        "wait_s": 0.5,
        "prefill_s": 0.2,
        "decode_s": 2.0,
        "max_num_seqs": 1024,
        "kv_tokens": 750_000,
    }
    assert engine_timing(None) is None
    on_engine_clock = engine_timing({**metrics, "rayllm_clock_offset": 1_699_999_000.0})
    assert on_engine_clock is not None and on_engine_clock["arrival"] == 1_699_999_050.0  # queued_ts + offset
    assert engine_timing({**metrics, "scheduled_ts": 0.0}) is None  # never scheduled: no timing


def test_timings_travel_in_usage_json_to_the_driver():
    metrics = {"arrival_time": 10.0, "queued_ts": 1.0, "scheduled_ts": 1.0, "first_token_ts": 1.5, "last_token_ts": 3.5}
    result = {"usage_json": json.dumps({"batch": {"in": 100, "out": 40, "latency_s": 2.5}}), "generated_text": "x"}
    stamped = with_engine_timing(result, "batch", metrics)
    assert json.loads(stamped["usage_json"])["batch"]["engine"]["decode_s"] == 2.0
    assert with_engine_timing(result, "batch", None) is result
    traces = EngineTraces()
    traces.observe(stamped["usage_json"])
    traces.observe(result["usage_json"])  # no engine timing: ignored
    traces.observe(None)
    assert list(traces.steps) == ["batch"] and traces.steps["batch"].requests == 1
    assert traces.steps["batch"].tokens_out == 40


def test_efficiency_line_reads_at_a_glance():
    trace = EngineTrace()
    for _ in range(128):
        trace.add(arrival=0.0, wait_s=0.0, prefill_s=0.0, decode_s=10.0, prompt_tokens=250, output_tokens=100, max_num_seqs=1024)
    summary = trace.summary(kv_capacity_estimate=750_000)
    roofline = decode_roofline(LLAMA_8B, H200, summary["running"]["mean"], summary["context_tokens_mean"])
    summary["roofline"], summary["roofline_efficiency"] = roofline, efficiency(summary, roofline)
    line = efficiency_line(summary)
    assert "1,280 decode tok/s" in line and "running 128 mean / 128 max of 1024" in line
    assert "KV 5.1% mean (estimate capacity)" in line  # 128 x (250 + 50) of 750,000
    assert "% of the" in line and "H200, 4.8 TB/s" in line


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.floats(0, 20), st.floats(0, 2), st.floats(0, 1), st.floats(0, 5), st.integers(1, 500), st.integers(0, 64)),
        min_size=1,
        max_size=40,
    ),
    cut=st.integers(0, 40),
)
def test_traces_folded_per_block_and_absorbed_equal_one_trace(requests, cut):
    """Workers fold each block's rows into a trace of its own and the driver absorbs them: the
    summary is the one a single trace of every row gives."""

    def usage(arrival, wait, prefill, decode, tokens_in, tokens_out):
        timing = {"arrival": arrival, "wait_s": wait, "prefill_s": prefill, "decode_s": decode}
        return json.dumps({"batch": {"in": tokens_in, "out": tokens_out, "engine": timing}})

    whole, first, second = EngineTraces(), EngineTraces(), EngineTraces()
    for number, request in enumerate(requests):
        whole.observe(usage(*request))
        (first if number < cut else second).observe(usage(*request))
    absorbed = EngineTraces()
    absorbed.absorb(first)
    absorbed.absorb(second)
    # Summaries are rounded (to 0.1 at most): sums taken in another order may round the other way.
    assert flat(absorbed.steps["batch"].summary()) == pytest.approx(flat(whole.steps["batch"].summary()), abs=0.11)


def flat(value, path: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}[{i}]").items()}
    return {path: float(value) if value is not None else -1.0}  # None: not known
