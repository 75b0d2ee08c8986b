"""The row contract without an engine: declared types, failed rows shaped like good ones, and the
sampling parameters that reach vLLM after Ray Data's own block conversion (real Ray Data block
code, real `vllm.SamplingParams`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prefect_rayllm.rayllm_stages.config.models import SamplingParams
from prefect_rayllm.rayllm_stages.llm.engines import _vllm_preprocess
from prefect_rayllm.rayllm_stages.llm.rows import (
    RAY_ERROR_COLUMN,
    ROW_SCHEMA,
    SAMPLING_TYPE,
    EngineSampling,
    RowFailure,
    StageRow,
    conform,
    failure_of,
    rows_table,
)
from prefect_rayllm.rayllm_stages.llm.steps import PayloadStep


def good_row(index: int, sampling: EngineSampling, text: str = "Is red warm or cool?") -> dict:
    payload = {"messages": [{"role": "user", "content": text}], "sampling": sampling.model_dump(), "row": None}
    return StageRow(row_index=index, row_key=f"k{index}", row_json=json.dumps(payload)).model_dump()


def failed_row(index: int) -> dict:
    error = RowFailure(code="prompt_too_long", message="prompt is 900 tokens ...", step="batch")
    return StageRow(row_index=index, row_key=f"k{index}", row_json="{}", row_error=error.column()).model_dump()


def test_failed_rows_have_the_columns_and_types_of_good_ones():
    alone = rows_table([failed_row(0)])
    mixed = rows_table([good_row(0, EngineSampling()), failed_row(1)])
    assert alone.schema == mixed.schema == ROW_SCHEMA
    assert failure_of(alone.to_pylist()[0]) == RowFailure(
        code="prompt_too_long", message="prompt is 900 tokens ...", step="batch"
    )
    assert failure_of(mixed.to_pylist()[0]) is None


def test_rows_table_refuses_what_does_not_fit_the_schema():
    with pytest.raises(ValueError):
        rows_table([{"row_index": 0, "row_key": "a", "num_input_tokens": "many"}])
    assert rows_table([{"row_index": 0, "row_key": "a", "surprise": 1}]).schema == ROW_SCHEMA  # undeclared: dropped


def test_engine_sampling_has_every_key_with_fixed_types():
    unset = EngineSampling.from_params(SamplingParams())
    assert unset.top_k == -1 and unset.seed == -1 and unset.stop == ()
    assert list(unset.for_vllm()) == SAMPLING_TYPE.names
    values = EngineSampling.from_params(SamplingParams(temperature=1, top_k=5, seed=3, stop=["x"])).for_vllm()
    assert isinstance(values["temperature"], float) and isinstance(values["top_k"], int) and values["stop"] == ["x"]
    assert pa.array([unset.for_vllm(), values], type=SAMPLING_TYPE).null_count == 0
    assert EngineSampling.from_values({"top_k": 0, "seed": None, "stop": "END"}) == EngineSampling(stop=("END",))


def test_openai_body_leaves_neutral_vllm_extensions_out():
    assert set(EngineSampling().for_openai()) == {"temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty"}
    body = EngineSampling(top_k=3, seed=9, stop=("a",), min_tokens=1).for_openai()
    assert body["top_k"] == 3 and body["seed"] == 9 and body["stop"] == ["a"] and body["min_tokens"] == 1


def test_conform_folds_rays_error_rows_into_the_one_error_column():
    good = {**good_row(0, EngineSampling()), "generated_text": "warm", "num_input_tokens": 7, RAY_ERROR_COLUMN: ""}
    ours = {
        **failed_row(1),
        RAY_ERROR_COLUMN: "prompt is 900 tokens ...",
    }
    # Ray's own error row: our preprocess columns, Ray's intermediates, no result columns.
    rays = {
        **good_row(2, EngineSampling()),
        "prompt": "<|user|>x",
        "tokenized_prompt": [1, 2],
        RAY_ERROR_COLUMN: "ValueError: The decoder prompt (length 300) is longer than the maximum model length of 256.",
    }
    other = {**good_row(3, EngineSampling()), RAY_ERROR_COLUMN: "RuntimeError: engine died", "http_status": 200}
    refused = {**failed_row(4), "http_status": 401, RAY_ERROR_COLUMN: ""}  # an HTTP reply that failed the row
    table = pa.Table.from_pylist([good, ours, rays, other, refused])
    out = conform(table, step="answer")
    assert out.schema == ROW_SCHEMA
    rows = out.to_pylist()
    assert failure_of(rows[0]) is None and rows[0]["generated_text"] == "warm"
    assert failure_of(rows[1]) == RowFailure(code="prompt_too_long", message="prompt is 900 tokens ...", step="batch")
    assert failure_of(rows[2]).code == "prompt_too_long" and failure_of(rows[2]).step == "answer"
    assert failure_of(rows[3]).code == "engine_error" and "engine died" in failure_of(rows[3]).message
    assert rows[3]["http_status"] == 0  # not the earlier step's reply
    assert failure_of(rows[4]) is not None and rows[4]["http_status"] == 401


# -- what reaches vLLM, through Ray Data's own block conversion -----------------------------------

config_sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.one_of(st.none(), st.just(-1), st.integers(1, 100)),
    max_tokens=st.integers(1, 64),
    min_tokens=st.just(0),
    stop=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.5, 2),
)


@settings(max_examples=examples(ci=150, nightly=3000))
@given(st.lists(st.one_of(config_sampling.map(EngineSampling.from_params), st.none()), min_size=1, max_size=8))
@example([EngineSampling(top_k=5), None])  # issue 11: a refused row beside a row with top_k
@example([EngineSampling(seed=3), EngineSampling()])  # a seed in one row only
def test_every_good_row_reaches_vllm_with_its_own_sampling(ray_session, samplings):
    """Rows of one block, good (with these sampling params) or failed (None), through our
    preprocess and Ray Data's block building and numpy conversion, as Ray's vLLM stage receives
    them: every row builds a `vllm.SamplingParams`, a good one with its own values and types, a
    failed one the placeholder's (one token)."""
    import vllm
    from ray.data._internal.arrow_block import ArrowBlockAccessor
    from ray.data.block import BlockAccessor
    from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list

    rows = [good_row(i, s) if s is not None else failed_row(i) for i, s in enumerate(samplings)]
    prepared = [{"__data": {**row, **_vllm_preprocess(dict(row), PayloadStep())}} for row in rows]
    builder = BlockAccessor.for_block(pa.table({"x": [0]})).builder()
    for item in prepared:
        builder.add(item)
    block = builder.build()
    received = ArrowBlockAccessor(block).to_numpy()["__data"]
    for sampling, data in zip(samplings, received, strict=True):
        assert data[RAY_ERROR_COLUMN] == ""  # every row takes the same path; a failed one sends the placeholder
        params = maybe_convert_ndarray_to_list(dict(data["sampling_params"]))
        assert params.pop("structured_outputs") is None
        assert type(params["top_k"]) is int and type(params["seed"]) is int and type(params["max_tokens"]) is int
        built = vllm.SamplingParams(**params)
        if sampling is None:
            assert built.max_tokens == 1 and failure_of(data) is not None
            continue
        assert built.max_tokens == sampling.max_tokens and built.seed == (None if sampling.seed == -1 else sampling.seed)
        assert failure_of(data) is None
