"""Engines as `ray.data.llm` processors: vLLM in Ray actors, or any OpenAI-compatible HTTP endpoint.

A processor runs one step (`prefect_rayllm.rayllm_stages.llm.steps`): the step builds each row's request and records
the reply. Output columns (both engines): `generated_text`, `num_input_tokens`,
`num_generated_tokens`, `latency_s`, `http_status`, `engine_error` (empty on success),
`current_step`, and the pass-through columns (`row_index`, `row_key`, `row_json`, `usage_json`,
`payload_json`). A row the engine refuses (prompt too long, HTTP 4xx/5xx body, a reply that fails
the step's schema) comes back with an error set and skips every later stage and step; it never
stops the batch.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.llm.steps import ERROR_COLUMN, PASSTHROUGH, PayloadStep, StepFailed

ERROR_COLUMNS = (ERROR_COLUMN, "engine_error", "rayllm_error")
# vLLM on CPU reads gpu_memory_utilization as the share of host RAM for the KV cache; its
# default (0.92) fails at start on CPU, so CPU runs get a small share unless told otherwise.
CPU_ENGINE_DEFAULTS = {"gpu_memory_utilization": 0.1}
CPU_PLACEMENT = {"bundles": [{"CPU": 1}]}
# The chat-template, tokenize and detokenize actors and our pre/post maps are light; at a whole
# logical CPU each, three chained processors would not fit a local Ray and would wait forever.
LIGHT_STAGE = {"num_cpus": 0.25}
LIGHT_MAP_KWARGS = {"num_cpus": 0.25}
# One image per request: vLLM then reserves room for one image, not its default several.
IMAGE_ENGINE_DEFAULTS = {"limit_mm_per_prompt": {"image": 1}}
# Structured outputs on vLLM: without this, a weak model wanders in whitespace until max_tokens.
STRUCTURED_OUTPUTS_ENGINE_DEFAULTS = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_engine_processor(
    spec: ModelSpec,
    step: Any = None,
    *,
    api_key: str | None = None,
    gpu: bool | None = None,
    served: Any = None,
    cpu_cores: str | None = None,
):
    """A lazy `ray.data.llm` Processor running `step` (default: the batch request) on `spec`'s engine.

    `served` is the running `serve_engine.ServedEngine` when `spec.engine` is "serve"; `cpu_cores`
    ("0-3") pins a CPU vLLM engine's threads to those cores (see `cpu_core_sets`).
    """
    step = step or PayloadStep()
    if spec.engine == "http":
        return _http_processor(spec, step, api_key)
    if spec.engine == "serve":
        if served is None:
            raise ValueError("engine 'serve' needs the running engine (serve_engine.ensure_engine)")
        return _serve_processor(spec, step, served)
    return _vllm_processor(spec, step, cluster_has_gpu() if gpu is None else gpu, cpu_cores)


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


def engine_settings(spec: ModelSpec, gpu: bool, structured_outputs: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """vLLM engine kwargs and placement for `spec`: CPU defaults and one CPU bundle without a GPU."""
    engine_kwargs = dict(spec.engine_kwargs)
    if structured_outputs:
        engine_kwargs = {**STRUCTURED_OUTPUTS_ENGINE_DEFAULTS, **engine_kwargs}
    placement = spec.placement_group_config
    if not gpu:
        engine_kwargs = {**CPU_ENGINE_DEFAULTS, **engine_kwargs}
        placement = placement or CPU_PLACEMENT
    return engine_kwargs, placement


def vllm_processor_config(
    spec: ModelSpec, gpu: bool, structured_outputs: bool = False, cpu_cores: str | None = None, images: bool = False
):
    """The `vLLMEngineProcessorConfig` for `spec` (CPU placement chosen when there is no GPU).

    `images`: rows carry images in their messages (Ray's multimodal stage parses them).
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs, placement = engine_settings(spec, gpu, structured_outputs)
    if images:
        engine_kwargs = {**IMAGE_ENGINE_DEFAULTS, **engine_kwargs}
    options: dict[str, Any] = dict(
        model_source=spec.source,
        engine_kwargs=engine_kwargs,
        concurrency=spec.concurrency,
        batch_size=spec.batch_size,
        accelerator_type=spec.accelerator_type,
        placement_group_config=placement,
        should_continue_on_error=True,
        chat_template_stage=dict(LIGHT_STAGE),
        tokenize_stage=dict(LIGHT_STAGE),
        detokenize_stage=dict(LIGHT_STAGE),
    )
    if images:
        multimodal: dict[str, Any] = {**LIGHT_STAGE, "enabled": True}
        if "dtype" in engine_kwargs:
            multimodal["model_config_kwargs"] = {"dtype": engine_kwargs["dtype"]}
        options["prepare_multimodal_stage"] = multimodal
    if cpu_cores and not gpu:
        options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": cpu_cores}}
    options.update(spec.processor_kwargs)
    return vLLMEngineProcessorConfig(**options)


def _vllm_processor(spec: ModelSpec, step: Any, gpu: bool, cpu_cores: str | None = None):
    structured = bool(getattr(step, "json_schema", None))
    images = bool(getattr(step, "images", False))
    # A prompt's image tokens are only known after Ray's multimodal stage: no length check before it.
    guard = None if images else PromptLengthGuard(spec.source, spec.engine_kwargs.get("max_model_len"))
    return _processor(
        vllm_processor_config(spec, gpu, structured_outputs=structured, cpu_cores=cpu_cores, images=images),
        functools.partial(_vllm_preprocess, step=step, guard=guard),
        functools.partial(_vllm_postprocess, step=step),
    )


def _processor(config: Any, preprocess: Any, postprocess: Any):
    """A `ray.data.llm` processor with our light pre/post maps (see LIGHT_MAP_KWARGS)."""
    from ray.data.llm import build_processor

    return build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=dict(LIGHT_MAP_KWARGS),
        postprocess_map_kwargs=dict(LIGHT_MAP_KWARGS),
    )


def upstream_error(row: dict[str, Any]) -> str:
    """The error a row already carries from an earlier stage or step ("" if none)."""
    return next((row[c] for c in ERROR_COLUMNS if row.get(c)), "")


# A row that already failed still goes through every later stage, with this placeholder request
# and one token: rows that skip Ray's stages come out with other columns than the rest, and Ray
# Data then fails to concatenate the blocks (or fills gaps with nulls that change types).
_PLACEHOLDER_MESSAGES = [{"role": "user", "content": "."}]


class PromptLengthGuard:
    """Refuses a prompt longer than the model's context before it reaches Ray's vLLM stage.

    Ray turns such a prompt into an error row whose columns differ in type from its success rows
    (no `metrics` struct, null token lists); when a batch holds only such rows, Ray Data cannot
    concatenate the blocks and the whole job fails. Refused here, the row takes the placeholder
    path like every other failed row, with the reason. Picklable: the tokenizer loads lazily.
    """

    def __init__(self, source: str, max_model_len: int | None):
        self.source = source
        self.max_model_len = max_model_len

    def problem(self, messages: list[dict[str, Any]]) -> str | None:
        loaded = _tokenizer_and_limit(self.source, self.max_model_len)
        if loaded is None:
            return None
        tokenizer, limit = loaded
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens < limit:
            return None
        return f"prompt is {tokens} tokens; this model's maximum context length is {limit} tokens"


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


def _step_request(row: dict[str, Any], step: Any, guard: PromptLengthGuard | None = None) -> tuple[list, dict, dict[str, str]]:
    """(messages, sampling, error columns) for this step; a failed row gets the placeholder."""
    error, failed_step = upstream_error(row), row.get("failed_step") or ""
    if error and not failed_step:
        failed_step = row.get("current_step") or step.name  # a Ray error row from the last step
    if not error:
        fault = getattr(step, "injected_fault", None)
        if fault is not None:
            fault.maybe_fire()
        try:
            messages, sampling = step.request(row)
            too_long = guard.problem(messages) if guard is not None else None
            if too_long is None:
                return messages, sampling, {"rayllm_error": "", "failed_step": ""}
            error, failed_step = too_long if isinstance(step, PayloadStep) else f"step {step.name}: {too_long}", step.name
        except StepFailed as exc:
            error, failed_step = f"step {step.name}: {exc}", step.name
    sampling = {**getattr(step, "sampling", {}), "max_tokens": 1, "min_tokens": 0}
    return _PLACEHOLDER_MESSAGES, sampling, {"rayllm_error": error, "failed_step": failed_step}


def _vllm_preprocess(row: dict[str, Any], step: Any, guard: PromptLengthGuard | None = None) -> dict[str, Any]:
    messages, sampling, errors = _step_request(row, step, guard)
    # ERROR_COLUMN is always "": Ray's stages skip a row whose error column is anything else
    # (None included, which Arrow puts in a column some rows lack).
    return {"messages": messages, "sampling_params": sampling, "current_step": step.name, ERROR_COLUMN: "", **errors}


def _vllm_postprocess(row: dict[str, Any], step: Any) -> dict[str, Any]:
    latency = row.get("time_taken_llm")
    return _step_result(
        row,
        step,
        row.get("generated_text") or "",
        int(row.get("num_input_tokens") or 0),
        int(row.get("num_generated_tokens") or 0),
        float(latency) if latency is not None and latency >= 0 else None,
        200,
    )


def _step_result(
    row: dict[str, Any], step: Any, text: str, tokens_in: int, tokens_out: int, latency: float | None, status: int
) -> dict[str, Any]:
    passthrough = {name: row[name] for name in PASSTHROUGH if name in row}
    carried = row.get("rayllm_error") or ""
    if carried:  # failed in an earlier step (or in this step's request): pass the error on
        return {
            **passthrough,
            "generated_text": "",
            "num_input_tokens": 0,
            "num_generated_tokens": 0,
            "latency_s": None,
            "http_status": 0,
            "current_step": row["failed_step"],
            "engine_error": carried,
            "rayllm_error": carried,
            "failed_step": row["failed_step"],
            ERROR_COLUMN: "",
        }
    usage = json.loads(row.get("usage_json") or "{}")
    usage[step.name] = {"in": tokens_in, "out": tokens_out, "latency_s": latency}
    result = {
        **passthrough,
        "usage_json": json.dumps(usage),
        "generated_text": text,
        "num_input_tokens": tokens_in,
        "num_generated_tokens": tokens_out,
        "latency_s": latency,
        "http_status": status,
        "current_step": step.name,
        "engine_error": "",
        "rayllm_error": "",
        "failed_step": "",
        ERROR_COLUMN: "",  # see _vllm_preprocess: a None here would make later stages skip the row
    }
    try:
        result.update(step.record(row, text))
    except StepFailed as exc:
        message = f"step {step.name}: {exc}"
        result.update(engine_error=message, rayllm_error=message, failed_step=step.name)
    return result


def _http_processor(spec: ModelSpec, step: Any, api_key: str | None):
    from ray.data.llm import HttpRequestProcessorConfig

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    options: dict[str, Any] = dict(
        url=spec.base_url.rstrip("/") + "/chat/completions",
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


def _status_recording_session():
    """An aiohttp session whose JSON bodies carry the HTTP status and the request's latency, and
    whose non-JSON bodies become JSON error bodies instead of failing the whole Ray job."""
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

    async def started(session: Any, context: Any, params: Any) -> None:
        context.started = time.perf_counter()

    async def answered(session: Any, context: Any, params: Any) -> None:
        params.response.rayllm_latency_s = time.perf_counter() - context.started

    timing = aiohttp.TraceConfig()
    timing.on_request_start.append(started)
    timing.on_request_end.append(answered)
    return aiohttp.ClientSession(response_class=StatusRecordingResponse, trace_configs=[timing])


# OpenAI-compatible names of our sampling fields; top_k, min_tokens and repetition_penalty are
# vLLM extensions, sent only when they differ from the neutral value.
_HTTP_EXTENSION_NEUTRAL = {"top_k": None, "min_tokens": 0, "repetition_penalty": 1.0}


def openai_chat_body(model_name: str, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion body from our engine-side sampling dict."""
    body: dict[str, Any] = {"model": model_name, "messages": messages}
    for name, value in sampling.items():
        if name in _HTTP_EXTENSION_NEUTRAL and value in (_HTTP_EXTENSION_NEUTRAL[name], -1):
            continue
        if name == "stop" and not value:
            continue
        if name == "structured_outputs":
            schema = json.loads(value["json"]) if isinstance(value["json"], str) else value["json"]
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
            continue
        body[name] = value
    return body


def _http_preprocess(row: dict[str, Any], model_name: str, step: Any) -> dict[str, Any]:
    messages, sampling, errors = _step_request(row, step)
    return {"payload": openai_chat_body(model_name, messages, sampling), "current_step": step.name, ERROR_COLUMN: "", **errors}


def _http_postprocess(row: dict[str, Any], step: Any) -> dict[str, Any]:
    response = row.get("http_response") or {}
    status = int(response.get("rayllm_http_status") or 0)
    latency = response.get("rayllm_latency_s")
    return _chat_response_result(row, step, response, status, latency=float(latency) if latency is not None else None)


def _chat_response_result(
    row: dict[str, Any], step: Any, response: dict[str, Any], status: int, latency: float | None
) -> dict[str, Any]:
    """The step result of an OpenAI chat completion response (or of its error body)."""
    choices = response.get("choices")
    if row.get("rayllm_error"):
        return _step_result(row, step, "", 0, 0, None, status)
    if status != 200 or response.get("error") or choices is None or len(choices) == 0:
        error = response.get("error") or response.get("message") or "response has no choices"
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)
        result = _step_result(row, step, "", 0, 0, None, status)
        result["engine_error"] = f"HTTP {status}: {error}"
        return result
    usage = response.get("usage") or {}
    message = choices[0].get("message") or {}
    return _step_result(
        row,
        step,
        message.get("content") or "",
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        latency,
        status,
    )


def _serve_processor(spec: ModelSpec, step: Any, served: Any):
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
        functools.partial(_serve_preprocess, model_name=served.model_id, step=step),
        functools.partial(_serve_postprocess, step=step),
    )


def _error_status(error: Any) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    return int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else 400


def _serve_preprocess(row: dict[str, Any], model_name: str, step: Any) -> dict[str, Any]:
    from prefect_rayllm.rayllm_stages.llm.serve_requests import BODY_FIELD

    messages, sampling, errors = _step_request(row, step)
    body = openai_chat_body(model_name, messages, sampling)
    return {
        "method": "chat",
        "dtype": "ChatRequestFromJson",
        "request_kwargs": {BODY_FIELD: json.dumps(body)},
        "current_step": step.name,
        ERROR_COLUMN: "",
        **errors,
    }


def _serve_postprocess(row: dict[str, Any], step: Any) -> dict[str, Any]:
    # The stage merges the deployment's reply into the row: choices and usage on success, error on refusal.
    response = {name: row.get(name) for name in ("choices", "usage", "error", "message")}
    status = _error_status(response["error"]) if response["error"] else 200
    latency = row.get("time_taken")
    return _chat_response_result(row, step, response, status, float(latency) if latency is not None else None)


def engine_error_of(row: dict[str, Any]) -> str:
    """The error of an output row: ours, or Ray's (its error rows skip our postprocess)."""
    return upstream_error(row)
