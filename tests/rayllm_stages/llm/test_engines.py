"""Engine settings without an engine: which engine kwargs vLLM gets, and a request's path through
the preprocess (every engine: the same request, or the same refusal)."""

from __future__ import annotations

import json

from prefect_rayllm.rayllm_stages.config.models import ModelSpec, PromptTemplate
from prefect_rayllm.rayllm_stages.llm.engines import (
    CPU_PLACEMENT,
    PromptRenderer,
    RenderPrompts,
    _http_preprocess,
    _serve_preprocess,
    _unwrap_body,
    _vllm_preprocess,
    engine_kwargs_for,
    placement_for,
    prepare_request,
)
from prefect_rayllm.rayllm_stages.llm.rows import ERROR_COLUMN, RAY_ERROR_COLUMN, EngineSampling, RowFailure, StageRow
from prefect_rayllm.rayllm_stages.llm.steps import ChatRequest, LLMStep, PayloadStep, StepFailed, TemplateStep
from prefect_rayllm.rayllm_stages.llm.vision import ImageStep
from prefect_rayllm.rayllm_stages.testing.faults import StepFaultInjector


def test_engine_kwargs_merge_every_default_in_one_place():
    spec = ModelSpec(source="m", engine_kwargs={"max_model_len": 256})
    assert engine_kwargs_for(spec, gpu=False) == {"gpu_memory_utilization": 0.1, "max_model_len": 256}
    assert engine_kwargs_for(spec, gpu=True) == {"max_model_len": 256}
    structured = engine_kwargs_for(spec, gpu=True, structured_outputs=True)
    assert structured["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    images = engine_kwargs_for(spec, gpu=False, images=True)
    assert images["limit_mm_per_prompt"] == {"image": 1} and images["gpu_memory_utilization"] == 0.1


def test_the_users_engine_kwargs_win_over_every_default():
    mine = {
        "gpu_memory_utilization": 0.3,
        "structured_outputs_config": {"backend": "guidance"},
        "limit_mm_per_prompt": {"image": 2},
    }
    spec = ModelSpec(source="m", engine_kwargs=mine)
    assert engine_kwargs_for(spec, gpu=False, structured_outputs=True, images=True) == mine


def test_placement_is_one_cpu_bundle_only_without_a_gpu_and_without_the_users_own():
    assert placement_for(ModelSpec(source="m"), gpu=False) == CPU_PLACEMENT
    assert placement_for(ModelSpec(source="m"), gpu=True) is None
    own = {"bundles": [{"CPU": 2}]}
    assert placement_for(ModelSpec(source="m", placement_group_config=own), gpu=False) == own


def test_processor_config_and_serve_config_get_the_same_kwargs():
    from prefect_rayllm.rayllm_stages.llm.engines import vllm_processor_config
    from prefect_rayllm.rayllm_stages.llm.serve_engine import llm_config

    spec = ModelSpec(source="m", engine_kwargs={"max_model_len": 256})
    processor = vllm_processor_config(spec, gpu=False, structured_outputs=True)
    ray_added = {"task_type"}  # Ray's processor config adds the task
    given = {k: v for k, v in processor.engine_kwargs.items() if k not in ray_added}
    assert given == engine_kwargs_for(spec, gpu=False, structured_outputs=True)
    served = llm_config(spec, gpu=False)
    assert served.engine_kwargs == engine_kwargs_for(spec, gpu=False, structured_outputs=True)


def test_steps_have_the_step_protocol():
    from prefect_rayllm.rayllm_stages.config.models import SamplingParams

    template = TemplateStep("s", PromptTemplate(user="{{ x }}"), SamplingParams(), "out")
    steps = [PayloadStep(), template, ImageStep("caption", SamplingParams()), StepFaultInjector(template, 1, "/tmp/unused")]
    assert all(isinstance(step, LLMStep) for step in steps)


def _row(**data) -> dict:
    return StageRow(row_index=3, row_key="k3", row_json=json.dumps(data)).model_dump()


def test_a_failed_row_keeps_its_error_and_sends_a_request_of_the_same_shape():
    step = TemplateStep("answer", PromptTemplate(user="{{ x }}"), EngineSampling(top_k=5, seed=1), "out")
    good = _vllm_preprocess(_row(x="hi"), step)
    refused = _vllm_preprocess(_row(x=None), step)  # a template field is null
    upstream = _vllm_preprocess(
        {**_row(x="hi"), ERROR_COLUMN: RowFailure(code="decode_error", message="bad", step="decode").column()}, step
    )
    assert good[ERROR_COLUMN]["code"] == "" and good["sampling_params"]["top_k"] == 5
    assert good["messages"] == [{"role": "user", "content": "hi"}]
    assert refused[ERROR_COLUMN]["code"] == "step_error" and refused[ERROR_COLUMN]["step"] == "answer"
    assert upstream[ERROR_COLUMN] == {"code": "decode_error", "message": "bad", "step": "decode"}
    for failed in (refused, upstream):
        assert failed[RAY_ERROR_COLUMN] == good[RAY_ERROR_COLUMN] == ""  # every row takes the same path
        assert failed["messages"] == step.placeholder.messages and failed["sampling_params"]["max_tokens"] == 1
        assert set(failed) - {"http_status"} == set(good)
        assert {k: type(v) for k, v in failed["sampling_params"].items()} == {
            k: type(v) for k, v in good["sampling_params"].items()
        }
    for preprocess in (_http_preprocess, _serve_preprocess):
        failed, ok = (
            preprocess(_row(x=None), model_name="tiny", step=step),
            preprocess(_row(x="hi"), model_name="tiny", step=step),
        )
        assert set(failed) - {"http_status"} == set(ok) and failed[ERROR_COLUMN]["code"] == "step_error"
    # HTTP: nothing is sent for it (Ray's HTTP stage passes rows with its error column by)
    failed = _http_preprocess(_row(x=None), model_name="tiny", step=step)
    assert failed[RAY_ERROR_COLUMN] and failed["payload"] == {"body_json": ""}


def test_a_failed_row_comes_out_of_the_postprocess_as_it_came_in():
    from prefect_rayllm.rayllm_stages.llm.engines import _vllm_postprocess

    step = TemplateStep("answer", PromptTemplate(user="{{ x }}"), EngineSampling(), "out")
    failure = RowFailure(code="prompt_too_long", message="too long", step="answer")
    # The placeholder's reply comes back like any other; the row's own error stands.
    row = {
        **_row(x="hi"),
        ERROR_COLUMN: failure.column(),
        "generated_text": "x",
        "num_input_tokens": 2,
        "num_generated_tokens": 1,
    }
    out = _vllm_postprocess(row, step)
    assert out[ERROR_COLUMN] == failure.column() and out["generated_text"] == "" and out["num_input_tokens"] == 0
    assert out["row_json"] == row["row_json"] and out["usage_json"] == row["usage_json"]


def test_http_and_serve_bodies_travel_as_json_text():
    row = _row(messages=[{"role": "user", "content": "hi"}], sampling=EngineSampling(top_k=4).model_dump(), row=None)
    http = _http_preprocess(row, model_name="tiny", step=PayloadStep())
    body = json.loads(http["payload"]["body_json"])
    assert body["model"] == "tiny" and body["top_k"] == 4 and "seed" not in body
    assert _unwrap_body(json.dumps(http["payload"])) == http["payload"]["body_json"]
    assert _unwrap_body('{"other": 1}') == '{"other": 1}'
    serve = _serve_preprocess(row, model_name="tiny", step=PayloadStep())
    assert json.loads(serve["request_kwargs"]["body_json"]) == body


def test_prompt_length_guard_uses_the_openai_rule(tiny_models):
    guard = PromptRenderer(str(tiny_models["good"]), 256)
    short = [{"role": "user", "content": "Is red warm or cool?"}]
    assert guard.problem(ChatRequest(short, EngineSampling(max_tokens=8))) is None
    problem = guard.problem(ChatRequest(short, EngineSampling(max_tokens=250)))
    assert problem is not None and "max_tokens is 250; this model's maximum context length is 256 tokens" in problem
    outcome = prepare_request(
        _row(messages=[{"role": "user", "content": "word " * 400}], sampling=EngineSampling().model_dump(), row=None),
        PayloadStep(),
        guard,
    )
    assert isinstance(outcome, RowFailure) and outcome.code == "prompt_too_long" and outcome.step == "batch"


def test_text_rows_reach_vllm_as_token_ids_without_rays_template_and_tokenize_stages(tiny_models):
    from transformers import AutoTokenizer

    from prefect_rayllm.rayllm_stages.llm.engines import vllm_processor_config

    source = str(tiny_models["good"])
    renderer = PromptRenderer(source, 256)
    step = TemplateStep("answer", PromptTemplate(user="{{ x }}"), EngineSampling(max_tokens=4), "out")
    render = RenderPrompts(step, renderer)
    row = render(_row(x="Is red warm or cool?"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is red warm or cool?"}], tokenize=False, add_generation_prompt=True
    )
    assert row["tokenized_prompt"] == tokenizer(text, add_special_tokens=False)["input_ids"] and "messages" not in row
    failed = render(_row(x="word " * 400))
    assert failed[ERROR_COLUMN]["code"] == "prompt_too_long" and failed["tokenized_prompt"] == renderer.token_ids(
        step.placeholder
    )
    assert set(failed) == set(row) | {"http_status"} and row["row_key"] == "k3"
    spec = ModelSpec(source=source, engine_kwargs={"max_model_len": 256})
    config = vllm_processor_config(spec, gpu=False, rendered_prompts=True)
    assert not config.chat_template_stage["enabled"] and not config.tokenize_stage["enabled"]
    assert not config.detokenize_stage["enabled"]


def test_step_failed_carries_its_code():
    assert StepFailed("x").code == "step_error"
