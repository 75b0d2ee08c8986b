"""Engines as `ray.data.llm` processors: vLLM in Ray actors, or any OpenAI-compatible HTTP endpoint.

Input column: `payload_json` (a JSON string `{"messages": [...], "sampling": {...}}`).
Output columns (both engines): `generated_text`, `num_input_tokens`, `num_generated_tokens`,
`latency_s`, `http_status`, `engine_error` (empty string on success) and the input columns.
A row the engine refuses (prompt too long, HTTP 4xx/5xx JSON body) comes back with `engine_error`
set; it never stops the batch.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .config import ModelSpec

# Ray's processors keep their own columns under this name.
_RAY_ERROR_COLUMN = "__inference_error__"
_PASSTHROUGH_COLUMNS = ("row_index", "row_key", "payload_json")
# vLLM on CPU reads gpu_memory_utilization as the share of host RAM for the KV cache; its
# default (0.92) fails at start on CPU, so CPU runs get a small share unless told otherwise.
CPU_ENGINE_DEFAULTS = {"gpu_memory_utilization": 0.1}
CPU_PLACEMENT = {"bundles": [{"CPU": 1}]}


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_engine_processor(spec: ModelSpec, *, api_key: str | None = None, gpu: bool | None = None):
    """A lazy `ray.data.llm` Processor for `spec`: call it on a Dataset with a `payload_json` column."""
    if spec.engine == "http":
        return _http_processor(spec, api_key)
    return _vllm_processor(spec, cluster_has_gpu() if gpu is None else gpu)


def vllm_processor_config(spec: ModelSpec, gpu: bool):
    """The `vLLMEngineProcessorConfig` for `spec` (CPU placement chosen when there is no GPU)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = dict(spec.engine_kwargs)
    placement = spec.placement_group_config
    if not gpu:
        engine_kwargs = {**CPU_ENGINE_DEFAULTS, **engine_kwargs}
        placement = placement or CPU_PLACEMENT
    options: dict[str, Any] = dict(
        model_source=spec.source,
        engine_kwargs=engine_kwargs,
        concurrency=spec.concurrency,
        batch_size=spec.batch_size,
        accelerator_type=spec.accelerator_type,
        placement_group_config=placement,
        should_continue_on_error=True,
    )
    options.update(spec.processor_kwargs)
    return vLLMEngineProcessorConfig(**options)


def _vllm_processor(spec: ModelSpec, gpu: bool):
    from ray.data.llm import build_processor

    return build_processor(
        vllm_processor_config(spec, gpu),
        preprocess=_vllm_preprocess,
        postprocess=_vllm_postprocess,
    )


def _vllm_preprocess(row: dict[str, Any]) -> dict[str, Any]:
    payload = json.loads(row["payload_json"])
    return {"messages": payload["messages"], "sampling_params": payload["sampling"]}


def _vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    latency = row.get("time_taken_llm")
    return {
        **{name: row[name] for name in _PASSTHROUGH_COLUMNS},
        "generated_text": row.get("generated_text") or "",
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
        "latency_s": float(latency) if latency is not None and latency >= 0 else None,
        "http_status": 200,
        "engine_error": "",
    }


def _http_processor(spec: ModelSpec, api_key: str | None):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    options: dict[str, Any] = dict(
        url=spec.base_url.rstrip("/") + "/chat/completions",  # type: ignore[union-attr]
        headers=headers,
        qps=spec.qps,
        max_retries=spec.max_retries,
        concurrency=spec.concurrency,
        batch_size=spec.batch_size,
        session_factory=functools.partial(_status_recording_session),
    )
    options.update(spec.processor_kwargs)
    model_name = spec.source
    return build_processor(
        HttpRequestProcessorConfig(**options),
        preprocess=functools.partial(_http_preprocess, model_name=model_name),
        postprocess=_http_postprocess,
    )


def _status_recording_session():
    """An aiohttp session whose JSON bodies carry the HTTP status, and whose non-JSON bodies
    become JSON error bodies instead of failing the whole Ray job."""
    import aiohttp

    class StatusRecordingResponse(aiohttp.ClientResponse):
        async def json(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            text = await self.text()
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                body = {"error": {"message": f"non-JSON response: {text[:300]}", "type": "invalid_response"}}
            body["rayllm_http_status"] = self.status
            return body

    return aiohttp.ClientSession(response_class=StatusRecordingResponse)


# OpenAI-compatible names of our sampling fields; top_k, min_tokens and repetition_penalty are
# vLLM extensions, sent only when they differ from the neutral value.
_HTTP_EXTENSION_NEUTRAL = {"top_k": None, "min_tokens": 0, "repetition_penalty": 1.0}


def _http_preprocess(row: dict[str, Any], model_name: str) -> dict[str, Any]:
    payload = json.loads(row["payload_json"])
    body: dict[str, Any] = {"model": model_name, "messages": payload["messages"]}
    for name, value in payload["sampling"].items():
        if name in _HTTP_EXTENSION_NEUTRAL and value in (_HTTP_EXTENSION_NEUTRAL[name], -1):
            continue
        body[name] = value
    return {"payload": body}


def _http_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    response = row.get("http_response") or {}
    status = int(response.get("rayllm_http_status") or 0)
    result = {name: row[name] for name in _PASSTHROUGH_COLUMNS}
    choices = response.get("choices")
    if status != 200 or response.get("error") or not choices:
        error = response.get("error") or response.get("message") or "response has no choices"
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)
        return {**result, "generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0,
                "latency_s": None, "http_status": status, "engine_error": f"HTTP {status}: {error}"}
    usage = response.get("usage") or {}
    message = choices[0].get("message") or {}
    return {
        **result,
        "generated_text": message.get("content") or "",
        "num_input_tokens": int(usage.get("prompt_tokens") or 0),
        "num_generated_tokens": int(usage.get("completion_tokens") or 0),
        "latency_s": None,  # Ray's HTTP stage does not time requests
        "http_status": status,
        "engine_error": "",
    }


def engine_error_of(row: dict[str, Any]) -> str:
    """The error of an output row: ours, or Ray's (its error rows skip our postprocess)."""
    return row.get("engine_error") or row.get(_RAY_ERROR_COLUMN) or ""
