"""Engines as `ray.data.llm` processors: vLLM in Ray actors, a Ray Serve LLM deployment, or any
OpenAI-compatible HTTP endpoint, each running one step (`steps.LLMStep`) over rows of the row
contract (`rows.ROW_SCHEMA`).

    rows (ROW_SCHEMA) --preprocess: step.request(row) -> the engine's request columns-->
      Ray's stages (vLLM: the prompt rendered to token ids in the preprocess, or for images Ray's
      multimodal and chat-template stages; or the Serve or HTTP call)
      --postprocess: step.record(row, reply) -> row_json, usage, generated_text, tokens-->
      --conform--> rows (ROW_SCHEMA)

A row that already failed, or fails here (a prompt and max_tokens longer than the context, a
template field that is null), keeps its `row_error` untouched and sends the step's placeholder
request instead of its own: one token, of the very shape of the step's requests (the same message
shape, a complete `EngineSampling`), so that every row of a block takes the same path through
Ray's stages and comes out with the same columns and types. (Rows that skip Ray's stages come out
without the columns those stages add; Ray 2.60 then fails to concatenate blocks where such a
column is null-typed in one and a struct in the other.) The HTTP path sends nothing for such a
row (see `_http_preprocess`). A reply the step cannot use (not matching
its schema) fails the row in the postprocess. `rows.conform` gives every row, good or failed (Ray's
own error rows included), the declared schema. One bad row never stops the batch, nor changes its
neighbours' types.

`engine_kwargs_for` answers "which engine kwargs will vLLM get?": every default (CPU, structured
outputs, images) is merged there, and only there.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from prefect_rayllm.rayllm_stages.compat.engine_hooks import with_engine_hook
from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.llm.capacity import size_vllm_options
from prefect_rayllm.rayllm_stages.llm.rows import (
    ERROR_COLUMN,
    NO_ERROR,
    RAY_ERROR_COLUMN,
    RowFailure,
    conform,
    failure_of,
)
from prefect_rayllm.rayllm_stages.llm.steps import ChatRequest, LLMStep, PayloadStep, StepFailed
from prefect_rayllm.rayllm_stages.runtime.engine_stats import with_engine_timing

# vLLM on CPU reads gpu_memory_utilization as the share of host RAM for the KV cache; its
# default (0.92) fails at start on CPU, so CPU runs get a small share unless told otherwise.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.1}
CPU_PLACEMENT: dict[str, Any] = {"bundles": [{"CPU": 1}]}
# One image per request: vLLM then reserves room for one image, not its default several.
IMAGE_ENGINE_DEFAULTS: dict[str, Any] = {"limit_mm_per_prompt": {"image": 1}}
# Structured outputs on vLLM: without this, a weak model wanders in whitespace until max_tokens.
STRUCTURED_OUTPUTS_ENGINE_DEFAULTS: dict[str, Any] = {
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}
}
# The chat-template, tokenize and detokenize actors and our pre/post maps are light; at a whole
# logical CPU each, three chained processors would not fit a local Ray and would wait forever.
LIGHT_STAGE = {"num_cpus": 0.25}
LIGHT_MAP_KWARGS = {"num_cpus": 0.25}


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def engine_kwargs_for(spec: ModelSpec, *, gpu: bool, structured_outputs: bool = False, images: bool = False) -> dict[str, Any]:
    """The vLLM engine kwargs for `spec`: our defaults, then the user's `engine_kwargs` over them.

    Defaults: a small KV-cache share on CPU (`CPU_ENGINE_DEFAULTS`), xgrammar without free
    whitespace when replies follow a JSON schema, one image per prompt for image steps. A key
    the user sets always wins. Batch processors, Serve-hosted engines and image steps all get
    their kwargs here.
    """
    defaults: dict[str, Any] = {}
    if not gpu:
        defaults.update(CPU_ENGINE_DEFAULTS)
    if structured_outputs:
        defaults.update(STRUCTURED_OUTPUTS_ENGINE_DEFAULTS)
    if images:
        defaults.update(IMAGE_ENGINE_DEFAULTS)
    return {**defaults, **spec.engine_kwargs}


def placement_for(spec: ModelSpec, *, gpu: bool) -> dict[str, Any] | None:
    """The engine's placement group: the user's, or one CPU bundle when the cluster has no GPU
    (without it the engine stage asks for a GPU and waits forever)."""
    if spec.placement_group_config is not None or gpu:
        return spec.placement_group_config
    return CPU_PLACEMENT


def build_engine_processor(
    spec: ModelSpec,
    step: LLMStep | None = None,
    *,
    api_key: str | None = None,
    gpu: bool | None = None,
    served: Any = None,
    cpu_cores: str | None = None,
) -> EngineStage:
    """A lazy stage running `step` (default: the batch request) on `spec`'s engine.

    `served` is the running `serve_engine.ServedEngine` when `spec.engine` is "serve"; `cpu_cores`
    ("0-3") pins a CPU vLLM engine's threads to those cores (see `cpu_core_sets`).
    """
    step = step or PayloadStep()
    if spec.engine == "http":
        return EngineStage(_http_processor(spec, step, api_key), step.name)
    if spec.engine == "serve":
        if served is None:
            raise ValueError("engine 'serve' needs the running engine (serve_engine.ensure_engine)")
        return EngineStage(_serve_processor(spec, step, served), step.name)
    processor, prepare = _vllm_processor(spec, step, cluster_has_gpu() if gpu is None else gpu, cpu_cores)
    return EngineStage(processor, step.name, prepare)


class EngineStage:
    """A `ray.data.llm` processor followed by `rows.conform`: Dataset of rows in, the same rows
    after one step out (lazily), both of `rows.ROW_SCHEMA`. `prepare`, when set, runs on the
    rows before the processor (the vLLM path renders prompts there, see `RenderPrompts`)."""

    def __init__(self, processor: Any, step_name: str, prepare: Callable[[Any], Any] | None = None):
        self.processor = processor
        self.step_name = step_name
        self.prepare = prepare

    def __call__(self, dataset: Any) -> Any:
        if self.prepare is not None:
            dataset = self.prepare(dataset)
        return self.processor(dataset).map_batches(
            conform,
            fn_kwargs={"step": self.step_name},
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
            **LIGHT_MAP_KWARGS,
        )


def cpu_core_sets(engines: int) -> list[str] | None:
    """Disjoint core ranges for `engines` CPU vLLM engines running at once on this machine.

    vLLM's CPU engine binds its OpenMP threads to every core by default; two engines doing so
    spin against each other and run slower together than one after the other. None when there
    is one engine, too few cores, the cluster has GPUs or more than one node, or the user pins
    threads through VLLM_CPU_OMP_THREADS_BIND.
    """
    import ray

    if engines < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ or cluster_has_gpu():
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1 or nodes[0].get("NodeManagerAddress") != ray.util.get_node_ip_address():
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < engines:
        return None
    size = len(cores) // engines
    chunks = [cores[i * size : (i + 1) * size] for i in range(engines)]
    chunks[-1].extend(cores[engines * size :])
    return [",".join(str(c) for c in chunk) for chunk in chunks]


def processor_sizing(spec: ModelSpec, engine_kwargs: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """How many engines and how many rows per engine call: as the spec says.

    GPU sizing (batches sized from the engine's capacity) plugs in here.
    """
    return {"concurrency": spec.concurrency, "batch_size": spec.batch_size}


def vllm_processor_config(
    spec: ModelSpec,
    gpu: bool,
    structured_outputs: bool = False,
    cpu_cores: str | None = None,
    images: bool = False,
    rendered_prompts: bool = False,
):
    """The `vLLMEngineProcessorConfig` for `spec` (CPU placement chosen when there is no GPU).

    `images`: rows carry images in their messages (Ray's multimodal stage parses them).
    `rendered_prompts`: rows carry their prompt's token ids (`PromptRenderer`): Ray's chat-template
    and tokenize stages are off. Ray's detokenize stage is always off: vLLM returns the text itself
    (Ray's stage only decoded it a second time, in more actors).
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = engine_kwargs_for(spec, gpu=gpu, structured_outputs=structured_outputs, images=images)
    ray_stage = {"enabled": False} if rendered_prompts else dict(LIGHT_STAGE)
    options: dict[str, Any] = dict(
        model_source=spec.source,
        engine_kwargs=engine_kwargs,
        accelerator_type=spec.accelerator_type,
        placement_group_config=placement_for(spec, gpu=gpu),
        should_continue_on_error=True,
        chat_template_stage=dict(ray_stage),
        tokenize_stage=dict(ray_stage),
        detokenize_stage={"enabled": False},
        **processor_sizing(spec, engine_kwargs, gpu),
    )
    if images:
        multimodal: dict[str, Any] = {**LIGHT_STAGE, "enabled": True}
        if "dtype" in engine_kwargs:
            multimodal["model_config_kwargs"] = {"dtype": engine_kwargs["dtype"]}
        options["prepare_multimodal_stage"] = multimodal
    if cpu_cores and not gpu:
        options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": cpu_cores}}
    options.update(spec.processor_kwargs)
    # GPU: engine defaults and batches sized from its capacity (user-set knobs win); all: final outputs only.
    user_keys = set(spec.processor_kwargs) | ({"batch_size"} & spec.model_fields_set)
    options, _ = size_vllm_options(options, gpu=gpu, user_keys=user_keys)
    return vLLMEngineProcessorConfig(**with_engine_hook(options))


def _processor(config: Any, preprocess: Any, postprocess: Any, preprocess_map_kwargs: dict[str, Any] | None = None):
    """A `ray.data.llm` processor with our light pre/post maps (see LIGHT_MAP_KWARGS)."""
    from ray.data.llm import build_processor

    return build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=preprocess_map_kwargs or dict(LIGHT_MAP_KWARGS),
        postprocess_map_kwargs=dict(LIGHT_MAP_KWARGS),
    )


# -- the request: one path for every engine ---------------------------------------------------------


class PromptRenderer:
    """A chat request as the model sees it: the chat template applied (as vLLM's chat endpoint
    does: a generation prompt, or the final assistant message continued) and tokenized. Refuses,
    before any engine sees it, a request whose prompt and `max_tokens` do not fit the model's
    context (as OpenAI's API and vLLM's server do), with code `prompt_too_long` and a message
    naming the limit. Picklable: the tokenizer loads lazily, once per worker process (Ray reuses
    its task workers, so once per worker, not per block)."""

    def __init__(self, source: str, max_model_len: int | None):
        self.source = source
        self.max_model_len = max_model_len

    def available(self) -> bool:
        """Whether the model's tokenizer and context length can be read where rows are rendered.
        Asked of a Ray worker when Ray is up: the driver never loads transformers and torch
        (hundreds of MiB that a flow process would carry for the whole run)."""
        import ray

        if not ray.is_initialized():
            return _can_render(self.source, self.max_model_len)
        return bool(ray.get(ray.remote(num_cpus=0)(_can_render).remote(self.source, self.max_model_len)))

    def token_ids(self, request: ChatRequest) -> list[int] | None:
        """The prompt's token ids, or None when the tokenizer cannot be read here."""
        loaded = _tokenizer_and_limit(self.source, self.max_model_len)
        if loaded is None:
            return None
        tokenizer, _ = loaded
        continues = bool(request.messages) and request.messages[-1].get("role") == "assistant"
        text = tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=not continues, continue_final_message=continues
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def problem(self, request: ChatRequest, token_ids: list[int] | None = None) -> str | None:
        """Why `request` does not fit the context, or None."""
        loaded = _tokenizer_and_limit(self.source, self.max_model_len)
        if loaded is None:
            return None
        tokens = len(token_ids if token_ids is not None else self.token_ids(request) or [])
        wanted = request.sampling.max_tokens
        limit = loaded[1]
        if tokens + wanted <= limit:
            return None
        return f"prompt is {tokens} tokens and max_tokens is {wanted}; this model's maximum context length is {limit} tokens"


def _can_render(source: str, max_model_len: int | None) -> bool:
    return _tokenizer_and_limit(source, max_model_len) is not None


@functools.lru_cache(maxsize=8)
def _tokenizer_and_limit(source: str, max_model_len: int | None):
    """(tokenizer, context length) of a model, or None when they cannot be read here (the
    engine then reports long prompts itself)."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        limit = max_model_len or getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
        return (tokenizer, int(limit)) if limit else None
    except Exception:
        return None


def prepare_request(row: Mapping[str, Any], step: LLMStep, guard: PromptRenderer | None = None) -> ChatRequest | RowFailure:
    """This step's request for `row`, or why the row does not run: the error it already carries
    (an earlier stage or step), the step's refusal, or a prompt that does not fit."""
    return _prepare(row, step, guard)[0]


def _prepare(
    row: Mapping[str, Any], step: LLMStep, renderer: PromptRenderer | None
) -> tuple[ChatRequest | RowFailure, list[int] | None]:
    """`prepare_request`, with the prompt's token ids when `renderer` rendered them."""
    carried = failure_of(row)
    if carried is not None:
        return carried, None
    try:
        request = step.request(row)
    except StepFailed as exc:
        return RowFailure(code=exc.code, message=str(exc), step=step.name), None
    if renderer is None:
        return request, None
    token_ids = renderer.token_ids(request)
    too_long = renderer.problem(request, token_ids)
    if too_long is not None:
        return RowFailure(code="prompt_too_long", message=too_long, step=step.name), None
    return request, token_ids


def _request_for(outcome: ChatRequest | RowFailure, step: LLMStep) -> tuple[ChatRequest, dict[str, Any]]:
    """The request a row sends, and its error columns: a row that does not run keeps its error and
    sends the step's placeholder (see the module docstring); Ray's error column stays "" for both."""
    if isinstance(outcome, RowFailure):
        return step.placeholder, {ERROR_COLUMN: outcome.column(), RAY_ERROR_COLUMN: "", "http_status": 0}
    return outcome, {ERROR_COLUMN: dict(NO_ERROR), RAY_ERROR_COLUMN: ""}


def _renderer_for(spec: ModelSpec, step: LLMStep) -> PromptRenderer | None:
    # A prompt's image tokens are only known after Ray's multimodal stage: no length check before it.
    if step.images:
        return None
    return PromptRenderer(spec.source, spec.engine_kwargs.get("max_model_len"))


# -- the result: one path for every engine ----------------------------------------------------------


def step_result(
    row: Mapping[str, Any], step: LLMStep, text: str, tokens_in: int, tokens_out: int, latency: float | None, status: int
) -> dict[str, Any]:
    """A row after `step`: its reply recorded (or the step's refusal of it as the row's error); a
    row that had failed before (it sent the placeholder) comes out as it came in."""
    carried = failure_of(row)
    if carried is not None:
        return failed_result(row, carried, 0)
    usage = json.loads(row.get("usage_json") or "{}")
    usage[step.name] = {"in": tokens_in, "out": tokens_out, "latency_s": latency}
    result = {
        "row_index": row["row_index"],
        "row_key": row["row_key"],
        "row_json": row["row_json"],
        "usage_json": json.dumps(usage),
        ERROR_COLUMN: dict(NO_ERROR),
        "generated_text": text,
        "num_input_tokens": tokens_in,
        "num_generated_tokens": tokens_out,
        "latency_s": latency,
        "http_status": status,
        RAY_ERROR_COLUMN: "",
    }
    try:
        result["row_json"] = step.record(row, text)
    except StepFailed as exc:
        result[ERROR_COLUMN] = RowFailure(code=exc.code, message=str(exc), step=step.name).column()
    return result


def failed_result(row: Mapping[str, Any], error: RowFailure, status: int) -> dict[str, Any]:
    """A failed row: the engine answered with an error (an HTTP error body, a Serve refusal), or it
    had failed before and sent the placeholder."""
    return {
        "row_index": row["row_index"],
        "row_key": row["row_key"],
        "row_json": row["row_json"],
        "usage_json": row.get("usage_json") or "{}",
        ERROR_COLUMN: error.column(),
        "generated_text": "",
        "num_input_tokens": 0,
        "num_generated_tokens": 0,
        "latency_s": None,
        "http_status": status,
        RAY_ERROR_COLUMN: "",
    }


def engine_error_of(row: Mapping[str, Any]) -> RowFailure | None:
    """The error of an output row (see `rows.failure_of`)."""
    return failure_of(row)


# -- vLLM ----------------------------------------------------------------------------------------------


# Prompts are rendered to token ids in a small autoscaling pool of long-lived actors, not in the
# processor's preprocess tasks: Ray ends an idle task worker within about a second when its node
# runs more workers than it has CPUs, and every new worker imported transformers and loaded the
# tokenizer again (seconds of CPU each). An actor loads it once. Up to one actor per engine (at
# least two). The actors ask for no CPU: an actor holds what it asks for the whole run, and the
# streaming repartition before it asks for a whole CPU (Ray's default, which Ray 2.60 does not let
# us set): on a 2-CPU Ray with one engine, a 0.25-CPU render actor left it 0.75 and the run hung.
RENDER_ACTORS_MIN = 2
RENDER_CPUS = 0


def _vllm_processor(spec: ModelSpec, step: LLMStep, gpu: bool, cpu_cores: str | None = None):
    """The processor for `step` on `spec`'s vLLM engine, and the stage that must run before it
    (rendering prompts in actors), or None when Ray's chat-template and tokenize stages do that."""
    structured = step.json_schema is not None
    renderer = _renderer_for(spec, step)
    if renderer is not None and not renderer.available():
        renderer = None
    config = vllm_processor_config(
        spec,
        gpu,
        structured_outputs=structured,
        cpu_cores=cpu_cores,
        images=step.images,
        rendered_prompts=renderer is not None,
    )
    if renderer is not None:
        processor = _processor(config, _already_rendered, functools.partial(_vllm_postprocess, step=step))
        most_engines = spec.replica_bounds[1]
        return processor, functools.partial(render_prompts, step=step, renderer=renderer, most_engines=most_engines)
    processor = _processor(
        config, functools.partial(_vllm_preprocess, step=step), functools.partial(_vllm_postprocess, step=step)
    )
    return processor, None


def render_prompts(dataset: Any, step: LLMStep, renderer: PromptRenderer, most_engines: int = 1) -> Any:
    """`dataset` with each row's engine request columns added, its prompt rendered to token ids
    (see `RenderPrompts`), in an autoscaling pool of light actors (see `RENDER_ACTORS_MIN`)."""
    from ray.data import ActorPoolStrategy

    return dataset.map(
        RenderPrompts,
        fn_constructor_kwargs={"step": step, "renderer": renderer},
        compute=ActorPoolStrategy(min_size=1, max_size=max(RENDER_ACTORS_MIN, most_engines)),
        num_cpus=RENDER_CPUS,
    )


class RenderPrompts:
    """Ray Data callable class: a row with the engine's request columns added, the prompt as
    token ids (`PromptRenderer`); a row that does not run keeps its error and sends the step's
    placeholder. The tokenizer loads once, when the actor starts."""

    def __init__(self, step: LLMStep, renderer: PromptRenderer):
        self.step = step
        self.renderer = renderer
        _tokenizer_and_limit(renderer.source, renderer.max_model_len)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        outcome, token_ids = _prepare(row, self.step, self.renderer)
        request, errors = _request_for(outcome, self.step)
        if token_ids is None:  # the placeholder of a row that does not run
            token_ids = self.renderer.token_ids(request)
        return {**row, "tokenized_prompt": token_ids, "sampling_params": request.sampling.for_vllm(), **errors}


def _already_rendered(row: dict[str, Any]) -> dict[str, Any]:
    """The processor's preprocess when `RenderPrompts` ran before it: nothing left to add."""
    return {}


def _vllm_preprocess(row: dict[str, Any], step: LLMStep) -> dict[str, Any]:
    """The request columns for Ray's chat-template and tokenize stages: the messages and the
    sampling params (used when the tokenizer cannot be read where rows are rendered, and for
    image steps)."""
    request, errors = _request_for(_prepare(row, step, None)[0], step)
    return {"messages": request.messages, "sampling_params": request.sampling.for_vllm(), **errors}


def _vllm_postprocess(row: dict[str, Any], step: LLMStep) -> dict[str, Any]:
    latency = row.get("time_taken_llm")
    result = step_result(
        row,
        step,
        row.get("generated_text") or "",
        int(row.get("num_input_tokens") or 0),
        int(row.get("num_generated_tokens") or 0),
        float(latency) if latency is not None and latency >= 0 else None,
        200,
    )
    return with_engine_timing(result, step.name, row.get("metrics"))  # how full the engine was (engine_stats)


# -- OpenAI-compatible HTTP ----------------------------------------------------------------------------

# The request body travels through Ray Data as JSON text (`{BODY_FIELD: text}`): as an Arrow struct,
# keys that some rows lack would be sent as nulls and ints as floats. `_status_recording_session`
# sends the text itself.
BODY_FIELD = "body_json"


def openai_chat_body(model_name: str, request: ChatRequest) -> dict[str, Any]:
    """An OpenAI chat completion body for `request`."""
    return {"model": model_name, "messages": request.messages, **request.sampling.for_openai()}


def _http_processor(spec: ModelSpec, step: LLMStep, api_key: str | None):
    from ray.data.llm import HttpRequestProcessorConfig

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    options: dict[str, Any] = dict(
        url=(spec.base_url or "").rstrip("/") + "/chat/completions",
        headers=headers,
        qps=spec.qps,
        max_retries=spec.max_retries,
        concurrency=spec.concurrency,
        batch_size=spec.batch_size,
        session_factory=_status_recording_session,
    )
    options.update(spec.processor_kwargs)
    return _processor(
        HttpRequestProcessorConfig(**options),
        functools.partial(_http_preprocess, model_name=spec.source, step=step),
        functools.partial(_http_postprocess, step=step),
    )


def _body_json(model_name: str, request: ChatRequest) -> str:
    return json.dumps(openai_chat_body(model_name, request), ensure_ascii=False)


def _http_preprocess(row: dict[str, Any], model_name: str, step: LLMStep) -> dict[str, Any]:
    """A row's request body; a row that does not run sends nothing to the endpoint (which may bill
    per request): it has Ray's error column set, so Ray's HTTP stage passes it by, and an empty
    body of the same type. The HTTP stage adds no column of its own to the rows it passes by, so
    its blocks concatenate whatever their mix (unlike the vLLM path: see the module docstring)."""
    outcome = prepare_request(row, step)
    if isinstance(outcome, RowFailure):
        return {
            "payload": {BODY_FIELD: ""},
            ERROR_COLUMN: outcome.column(),
            RAY_ERROR_COLUMN: outcome.message or outcome.code,
            "http_status": 0,
        }
    return {"payload": {BODY_FIELD: _body_json(model_name, outcome)}, **_request_for(outcome, step)[1]}


def _unwrap_body(data: Any) -> Any:
    """Ray's HTTP stage sends `json.dumps(payload)`; our payload is `{BODY_FIELD: body text}`."""
    if isinstance(data, str) and data.startswith('{"' + BODY_FIELD + '"'):
        payload = json.loads(data)
        if isinstance(payload, dict) and set(payload) == {BODY_FIELD}:
            return payload[BODY_FIELD]
    return data


def _status_recording_session():
    """An aiohttp session that sends each row's body text as is, and whose JSON replies carry the
    HTTP status and the request's latency; a non-JSON reply becomes a JSON error body instead of
    failing the whole Ray job."""
    import time

    import aiohttp

    class StatusRecordingResponse(aiohttp.ClientResponse):
        rayllm_latency_s: float | None = None

        async def json(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            text = await self.text()
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                body = {"error": {"message": f"non-JSON response: {text[:300]}", "type": "invalid_response"}}
            body["rayllm_http_status"] = self.status
            body["rayllm_latency_s"] = self.rayllm_latency_s
            return body

    class BodySendingSession(aiohttp.ClientSession):
        def _request(self, method: str, str_or_url: Any, **kwargs: Any):
            if "data" in kwargs:
                kwargs["data"] = _unwrap_body(kwargs["data"])
            return super()._request(method, str_or_url, **kwargs)

    async def started(session: Any, context: Any, params: Any) -> None:
        context.started = time.perf_counter()

    async def answered(session: Any, context: Any, params: Any) -> None:
        params.response.rayllm_latency_s = time.perf_counter() - context.started

    timing = aiohttp.TraceConfig()
    timing.on_request_start.append(started)
    timing.on_request_end.append(answered)
    return BodySendingSession(response_class=StatusRecordingResponse, trace_configs=[timing])


def _http_postprocess(row: dict[str, Any], step: LLMStep) -> dict[str, Any]:
    response = row.get("http_response") or {}
    status = int(response.get("rayllm_http_status") or 0)
    latency = response.get("rayllm_latency_s")
    return _chat_response_result(row, step, response, status, latency=float(latency) if latency is not None else None)


def _chat_response_result(
    row: Mapping[str, Any], step: LLMStep, response: Mapping[str, Any], status: int, latency: float | None
) -> dict[str, Any]:
    """The step result of an OpenAI chat completion response (or of its error body)."""
    carried = failure_of(row)
    if carried is not None:  # it sent the placeholder: whatever came back, its own error stands
        return failed_result(row, carried, 0)
    choices = response.get("choices")
    if status != 200 or response.get("error") or choices is None or len(choices) == 0:
        error = response.get("error") or response.get("message") or "response has no choices"
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)
        return failed_result(row, RowFailure.from_engine(f"HTTP {status}: {error}", step.name), status)
    usage = response.get("usage") or {}
    message = choices[0].get("message") or {}
    return step_result(
        row,
        step,
        message.get("content") or "",
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        latency,
        status,
    )


# -- Ray Serve LLM -------------------------------------------------------------------------------------


def _serve_processor(spec: ModelSpec, step: LLMStep, served: Any):
    from ray.data.llm import ServeDeploymentProcessorConfig

    from prefect_rayllm.rayllm_stages.llm.serve_requests import ChatRequestFromJson

    options: dict[str, Any] = dict(
        deployment_name=served.deployment_name,
        app_name=served.app_name,
        dtype_mapping={"ChatRequestFromJson": ChatRequestFromJson},
        should_continue_on_error=True,
        batch_size=spec.batch_size,
        concurrency=1,  # callers only; the engine's replicas come from spec.concurrency on the Serve side
    )
    options.update(spec.processor_kwargs)
    return _processor(
        ServeDeploymentProcessorConfig(**options),
        functools.partial(_serve_preprocess, model_name=served.model_id, step=step, guard=_renderer_for(spec, step)),
        functools.partial(_serve_postprocess, step=step),
    )


def _error_status(error: Any) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    return int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else 400


def _serve_preprocess(row: dict[str, Any], model_name: str, step: LLMStep, guard: PromptRenderer | None = None) -> dict[str, Any]:
    request, errors = _request_for(prepare_request(row, step, guard), step)
    return {
        "method": "chat",
        "dtype": "ChatRequestFromJson",
        "request_kwargs": {BODY_FIELD: _body_json(model_name, request)},
        **errors,
    }


def _serve_postprocess(row: dict[str, Any], step: LLMStep) -> dict[str, Any]:
    # The stage merges the deployment's reply into the row: choices and usage on success, error on refusal.
    response = {name: row.get(name) for name in ("choices", "usage", "error", "message")}
    status = _error_status(response["error"]) if response["error"] else 200
    latency = row.get("time_taken")
    return _chat_response_result(row, step, response, status, float(latency) if latency is not None else None)
