"""A Ray worker setup hook that patches Ray Data LLM's private vLLM stage: final outputs only, the engine's capacity.

Ray's vLLM stage (ray 2.60) builds `vllm.SamplingParams` with vLLM's default output kind,
CUMULATIVE: the engine's front end then builds a `RequestOutput` holding every token so far for each
running request after every decode step, and wakes the request's coroutine, though Ray keeps only
the last one. That is Python work per request per step in the engine actor's one event loop; on a
fast GPU it saturates that loop, finished requests are handed back late, and fewer new requests
reach the engine (vLLM's own `run_batch` asks for FINAL_ONLY for the same reason). `install` makes
the stage ask for FINAL_ONLY (same results: Ray returns only the finished output), and stamps the
engine's real capacity (`max_num_seqs`, KV-cache tokens) into each output's `metrics` so the run can
report how full the engine was (`runtime.engine_stats`).

Ray runs it when the engine stage's worker starts (`with_engine_hook`); every failure is logged and
leaves Ray's stage as it was.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_rayllm.rayllm_stages.compat.ray_private import RayCompatError, vllm_engine_stage, worker_setup_hook_env_var

logger = logging.getLogger(__name__)

HOOK = "prefect_rayllm.rayllm_stages.compat.engine_hooks.install"
# Ray's WORKER_PROCESS_SETUP_HOOK_ENV_VAR (checked against the installed Ray in `with_engine_hook`).
HOOK_ENV_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
CAPACITY_KEYS = ("rayllm_max_num_seqs", "rayllm_kv_tokens", "rayllm_clock_offset")
_capacity: dict[str, float] = {}


def install() -> None:
    """Patch Ray's vLLM stage in this worker process (idempotent, never raises)."""
    try:
        _install()
    except Exception as exc:  # an older or newer Ray: run its stage unchanged
        logger.warning("rayllm engine hook not installed (%s: %s)", type(exc).__name__, exc)


def _install() -> None:
    stage: Any = vllm_engine_stage()
    wrapper: Any = stage.vLLMEngineWrapper
    if getattr(wrapper, "_rayllm_hooked", False):
        return
    original_prepare = wrapper._prepare_llm_request
    original_init = wrapper.__init__
    original_output = stage.vLLMOutputData.from_vllm_engine_output.__func__

    async def _prepare_llm_request(self: Any, row: dict[str, Any]) -> Any:
        request = await original_prepare(self, row)
        final_only(request.params)
        return request

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _capacity.update(engine_capacity_of(self))

    def from_vllm_engine_output(cls: Any, output: Any) -> Any:
        data = original_output(cls, output)
        if isinstance(data.metrics, dict) and _capacity:
            data.metrics = {**data.metrics, **_capacity}
        return data

    wrapper._prepare_llm_request = _prepare_llm_request
    wrapper.__init__ = __init__
    stage.vLLMOutputData.from_vllm_engine_output = classmethod(from_vllm_engine_output)
    wrapper._rayllm_hooked = True


def final_only(params: Any) -> None:
    """Ask for the finished output only (sampling params of one sequence, CUMULATIVE by default)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    if isinstance(params, SamplingParams) and params.output_kind == RequestOutputKind.CUMULATIVE and params.n == 1:
        params.output_kind = RequestOutputKind.FINAL_ONLY


def engine_capacity_of(engine_wrapper: Any) -> dict[str, float]:
    """max_num_seqs and KV-cache tokens of a started Ray vLLM engine wrapper ({} where unknown)."""
    import time

    # Wall-clock minus monotonic on the engine's host: vLLM's engine timestamps are monotonic.
    found: dict[str, float] = {"rayllm_clock_offset": time.time() - time.monotonic()}
    try:
        config = engine_wrapper.engine.vllm_config
        found["rayllm_max_num_seqs"] = float(config.scheduler_config.max_num_seqs)
        blocks = config.cache_config.num_gpu_blocks
        if blocks:
            found["rayllm_kv_tokens"] = float(blocks * config.cache_config.block_size)
    except Exception:
        pass
    return found


CPU_STAGES = ("chat_template_stage", "tokenize_stage", "detokenize_stage", "prepare_multimodal_stage")


def with_engine_hook(options: dict[str, Any]) -> dict[str, Any]:
    """`vLLMEngineProcessorConfig` options whose engine stage runs `install` at worker start.

    Ray runs a worker's setup hook from the environment variable that `ray.init(runtime_env=
    {"worker_process_setup_hook": ...})` sets for a job; a runtime_env given to one stage must set
    that variable itself (its `worker_process_setup_hook` key is ignored there). The processor's
    runtime_env reaches every stage; the CPU stages configured as dicts keep the runtime_env they
    had, so only the engine actor imports vLLM for the hook. A runtime_env that already names a
    setup hook is left alone.
    """
    try:
        ray_env_var = worker_setup_hook_env_var()
    except RayCompatError as exc:  # a performance hook: Ray's stage runs unchanged without it
        logger.warning("rayllm engine hook not wired (%s)", exc)
        return options
    if ray_env_var != HOOK_ENV_VAR:
        logger.warning("rayllm engine hook not wired: Ray's setup hook variable is %s, not %s", ray_env_var, HOOK_ENV_VAR)
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if "worker_process_setup_hook" in runtime_env or HOOK_ENV_VAR in env_vars:
        return options
    options = dict(options)
    for stage in CPU_STAGES:
        config = options.get(stage)
        if isinstance(config, dict) and "runtime_env" not in config:
            options[stage] = {**config, "runtime_env": dict(runtime_env)}
    options["runtime_env"] = {**runtime_env, "env_vars": {**env_vars, HOOK_ENV_VAR: HOOK}}
    return options
