"""How many requests a vLLM engine holds at once, and how Ray Data LLM must feed it to keep it full.

vLLM runs at most `max_num_seqs` sequences at once, fewer when their KV cache does not fit. Ray Data
LLM feeds an engine replica in Ray Data tasks: the engine actor runs up to `max_concurrent_batches`
tasks at once, each task's rows are cut into `batch_size` batches (Ray Data runs up to four batches of
one task at once), and Ray's engine wrapper lets 1.1 x max_num_seqs of the rows it holds into vLLM.
A batch of requests with equal lengths finishes all at once, so the actor must hold more rows than
the engine runs, or the engine idles until Ray Data hands it the next task. Rows in flight per
replica are about `max_concurrent_batches * batch_size` (one batch per task, the least a task has).

On GPUs (`size_vllm_options`), unless the user set them:
- the engine gets vLLM's own offline defaults for the card (`max_num_seqs`, `max_num_batched_tokens`,
  what `vllm.LLM` would pick: 1024 / 16384 on H100/H200-class cards). Ray's engine wrapper passes no
  usage context to vLLM, which then falls back to 128 / 2048;
- `batch_size` and `max_concurrent_batches` hold twice the engine's concurrency in flight, and
  Ray's engine wrapper lets them all into vLLM (`max_pending_requests`; Ray's default, 1.1 x
  max_num_seqs, left vLLM a queue of about a tenth of a wave: when a wave of equal-length requests
  finished together, the engine ran nearly empty until the next rows were admitted);
- the chat-template, tokenize and detokenize stages may grow to a few actors each.
On CPUs nothing changes. `describe_plan` says what was chosen and why.

Example:
    >>> plan_batches(1024)
    BatchPlan(batch_size=128, max_concurrent_batches=16, rows_in_flight=2048, concurrency=1024)
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GiB = 1024**3
HEADROOM = 2.0  # rows in flight per replica = HEADROOM x the engine's concurrency
MIN_BATCH, MAX_BATCH = 16, 256
MIN_CONCURRENT_BATCHES, MAX_CONCURRENT_BATCHES = 2, 64
GPU_STAGE_CONCURRENCY = (1, 4)  # chat template, tokenize, detokenize actors on GPU clusters
ACTIVATION_RESERVE_BYTES = 4 * GiB  # per GPU: activations, CUDA graphs, allocator slack (vLLM profiles it)

# Datasheet memory (bytes) and peak memory bandwidth (bytes/s) by name, most specific first: the
# name is NVML's ("NVIDIA H100 80GB HBM3") or Ray's accelerator type ("H100", "A100-80G").
_CARDS: list[tuple[tuple[str, ...], float, float]] = [
    (("gb200",), 186e9, 8.0e12),
    (("b200",), 180e9, 8.0e12),
    (("gh200",), 96e9, 4.0e12),
    (("h200",), 141e9, 4.8e12),
    (("h100", "nvl"), 94e9, 3.9e12),
    (("h100", "pcie"), 80e9, 2.0e12),
    (("h100",), 80e9, 3.35e12),
    (("h800",), 80e9, 3.35e12),
    (("h20",), 96e9, 4.0e12),
    (("a100", "80"), 80e9, 2.039e12),
    (("a100",), 40e9, 1.555e12),
    (("l40s",), 48e9, 0.864e12),
    (("l40",), 48e9, 0.864e12),
    (("l4",), 24e9, 0.3e12),
    (("a10g",), 24e9, 0.6e12),
    (("a10",), 24e9, 0.6e12),
    (("t4",), 16e9, 0.32e12),
    (("v100",), 32e9, 0.9e12),
]


@dataclass(frozen=True)
class Accelerator:
    """One GPU model in the cluster: name, memory and datasheet memory bandwidth (None if unknown)."""

    name: str
    memory_bytes: float | None
    bandwidth_bytes_per_s: float | None
    count: int = 1
    source: str = "table"


def card_specs(name: str) -> tuple[float, float] | None:
    """(memory bytes, bandwidth bytes/s) from the datasheet table, or None for an unknown card."""
    lowered = name.lower()
    for parts, memory, bandwidth in _CARDS:
        if all(part in lowered for part in parts):
            return memory, bandwidth
    return None


def accelerator_from_name(name: str, count: int = 1, memory_bytes: float | None = None, source: str = "table") -> Accelerator:
    specs = card_specs(name)
    memory = memory_bytes if memory_bytes is not None else (specs[0] if specs else None)
    return Accelerator(
        name=name, memory_bytes=memory, bandwidth_bytes_per_s=specs[1] if specs else None, count=count, source=source
    )


@functools.lru_cache(maxsize=1)
def _nvml_accelerator() -> Accelerator | None:
    """GPU 0 of this machine through NVML (no CUDA context is created), or None."""
    try:
        import pynvml  # nvidia-ml-py (vLLM's CUDA build depends on it); without it, Ray's GPU type is used

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count < 1:
                return None
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = float(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return accelerator_from_name(name, count=count, memory_bytes=memory, source="nvml")


def detect_accelerator() -> Accelerator | None:
    """The cluster's GPU: this machine's (NVML), else the type Ray reports for its GPU nodes; None
    without GPUs."""
    local = _nvml_accelerator()
    if local is not None:
        return local
    try:
        import ray

        if not ray.is_initialized():
            return None
        resources = ray.cluster_resources()
    except Exception:
        return None
    gpus = int(resources.get("GPU", 0))
    if gpus < 1:
        return None
    types = sorted(key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:"))
    return accelerator_from_name(types[0] if types else "unknown GPU", count=gpus, source="ray")


def vllm_offline_defaults(accelerator: Accelerator) -> dict[str, int]:
    """vLLM 0.29's defaults for offline use (`vllm.LLM`) on this card: what its engine would pick
    with a usage context (vllm/engine/arg_utils.py, get_batch_defaults)."""
    memory = accelerator.memory_bytes or 0
    if memory >= 160 * GiB or (memory >= 70 * GiB and "a100" not in accelerator.name.lower()):
        return {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}
    return {"max_num_seqs": 256, "max_num_batched_tokens": 8192}


# -- the model's shape -----------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class ModelShape:
    """A decoder's dimensions: enough to count the bytes one decode step reads."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    weight_bytes_per_param: int = 2
    kv_bytes_per_value: int = 2

    @property
    def params(self) -> int:
        """Parameters of a Llama-style decoder (gated MLP, grouped-query attention, RMS norms)."""
        attention = (
            self.hidden_size * self.num_heads * self.head_dim * 2 + self.hidden_size * self.num_kv_heads * self.head_dim * 2
        )
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attention + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.params * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_value

    @classmethod
    def from_config(cls, config: dict[str, Any], engine_kwargs: dict[str, Any] | None = None) -> ModelShape | None:
        """From a Hugging Face config.json (a VLM's `text_config` for its decoder); None for shapes
        this count does not fit (mixture of experts, quantised weights)."""
        engine_kwargs = engine_kwargs or {}
        text = config.get("text_config") or config
        if any(k in text for k in ("num_local_experts", "num_experts", "n_routed_experts")) or "quantization_config" in config:
            return None
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            dtype = str(engine_kwargs.get("dtype") or text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
            dtype = "bfloat16" if dtype == "auto" else dtype.replace("torch.", "")
            weight_bytes = _DTYPE_BYTES.get(dtype, 2)
            kv_dtype = str(engine_kwargs.get("kv_cache_dtype") or "auto")
            return cls(
                num_layers=int(text["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                intermediate_size=int(text["intermediate_size"]),
                vocab_size=int(text["vocab_size"]),
                tie_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                weight_bytes_per_param=weight_bytes,
                kv_bytes_per_value=weight_bytes if kv_dtype == "auto" else _DTYPE_BYTES.get(kv_dtype, weight_bytes),
            )
        except (KeyError, TypeError, ValueError):
            return None


@functools.lru_cache(maxsize=16)
def _read_config(source: str) -> dict[str, Any] | None:
    local = Path(source) / "config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).to_dict()
    except Exception:
        return None


def read_model_shape(source: str, engine_kwargs: dict[str, Any] | None = None) -> ModelShape | None:
    """The shape of the model at `source` (a local folder or a hub id), or None if it cannot be read."""
    config = _read_config(source)
    return ModelShape.from_config(config, engine_kwargs) if config else None


# -- the engine's capacity and the batches that fill it -------------------------------------


@dataclass(frozen=True)
class EngineCapacity:
    """How many requests one engine replica runs at once: `max_num_seqs` (x pipeline stages), or
    fewer when their KV cache (estimated) does not fit."""

    max_num_seqs: int
    pipeline_parallel: int = 1
    kv_tokens: int | None = None
    tokens_per_request: int | None = None

    @property
    def kv_requests(self) -> int | None:
        if not self.kv_tokens or not self.tokens_per_request:
            return None
        return max(1, self.kv_tokens // self.tokens_per_request)

    @property
    def concurrency(self) -> int:
        seqs = self.max_num_seqs * self.pipeline_parallel
        kv = self.kv_requests
        return min(seqs, kv) if kv is not None else seqs


def estimate_kv_tokens(shape: ModelShape, accelerator: Accelerator, engine_kwargs: dict[str, Any]) -> int | None:
    """KV-cache tokens one replica holds: its GPUs' memory share less the weights and a reserve
    (vLLM measures this at start; this estimate only sizes batches and reports KV use)."""
    if not accelerator.memory_bytes:
        return None
    gpus = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
    if engine_kwargs.get("kv_cache_memory_bytes"):
        budget = float(engine_kwargs["kv_cache_memory_bytes"]) * gpus
    else:
        share = float(engine_kwargs.get("gpu_memory_utilization", 0.9))
        budget = gpus * (accelerator.memory_bytes * share - ACTIVATION_RESERVE_BYTES) - shape.weight_bytes
    return max(0, int(budget // shape.kv_bytes_per_token))


@dataclass(frozen=True)
class BatchPlan:
    """Batching that keeps one engine replica full: rows in flight = max_concurrent_batches x batch_size."""

    batch_size: int
    max_concurrent_batches: int
    rows_in_flight: int
    concurrency: int
    notes: tuple[str, ...] = field(default=(), compare=False, repr=False)


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, value)))))


def plan_batches(
    concurrency: int, *, batch_size: int | None = None, max_concurrent_batches: int | None = None, headroom: float = HEADROOM
) -> BatchPlan:
    """Batch size and concurrent batches that hold `headroom` x `concurrency` rows in flight.

    Batches of about an eighth of the engine's concurrency (16 to 256): a finished batch frees a
    small share of the engine, and enough batches are waiting to take its place. A value the user
    set is kept and the other is sized around it.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    target = math.ceil(headroom * concurrency)
    notes = []
    if batch_size is None:
        batch_size = min(MAX_BATCH, max(MIN_BATCH, _pow2_floor(concurrency / 8)))
        notes.append(f"batch_size {batch_size}: about 1/8 of the engine's {concurrency} concurrent requests")
    if max_concurrent_batches is None:
        max_concurrent_batches = min(MAX_CONCURRENT_BATCHES, max(MIN_CONCURRENT_BATCHES, math.ceil(target / batch_size)))
        notes.append(f"max_concurrent_batches {max_concurrent_batches}: {headroom:g} x {concurrency} rows in flight")
    rows = batch_size * max_concurrent_batches
    if rows < concurrency:
        notes.append(f"{rows} rows in flight cannot fill {concurrency} engine slots (user settings)")
    return BatchPlan(batch_size, max_concurrent_batches, rows, concurrency, tuple(notes))


def engine_capacity(
    engine_kwargs: dict[str, Any],
    shape: ModelShape | None,
    accelerator: Accelerator | None,
    tokens_per_request: int | None = None,
) -> EngineCapacity:
    """The capacity of one replica with these (already defaulted) engine kwargs."""
    kv = estimate_kv_tokens(shape, accelerator, engine_kwargs) if shape and accelerator else None
    return EngineCapacity(
        max_num_seqs=int(engine_kwargs.get("max_num_seqs") or 128),
        pipeline_parallel=int(engine_kwargs.get("pipeline_parallel_size", 1)),
        kv_tokens=kv,
        tokens_per_request=tokens_per_request,
    )


def _user_set(options: dict[str, Any], user_keys: set[str], name: str) -> bool:
    return name in user_keys and options.get(name) is not None


def size_vllm_options(
    options: dict[str, Any],
    *,
    gpu: bool,
    user_keys: set[str],
    accelerator: Accelerator | None = None,
    tokens_per_request: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """GPU defaults for `vLLMEngineProcessorConfig` options; returns (options, plan description).

    Args:
        options: The processor config's keyword arguments as built so far.
        gpu: Whether the engine runs on GPUs; on CPUs the options come back unchanged.
        user_keys: Option names the user set (`batch_size`, `max_concurrent_batches`, stage
            configs); engine kwargs the user set are those already in `options["engine_kwargs"]`.
        accelerator: The cluster's GPU (default: detected).
        tokens_per_request: Prompt plus output tokens of a typical request, if known (KV limit).
    """
    if not gpu:
        return options, None
    accelerator = accelerator or detect_accelerator()
    options = dict(options)
    engine_kwargs = dict(options.get("engine_kwargs") or {})
    added: dict[str, Any] = {}
    if accelerator is not None:
        for name, value in vllm_offline_defaults(accelerator).items():
            if name not in engine_kwargs:
                engine_kwargs[name] = added[name] = value
    options["engine_kwargs"] = engine_kwargs
    shape = read_model_shape(str(options.get("model_source", "")), engine_kwargs)
    capacity = engine_capacity(engine_kwargs, shape, accelerator, tokens_per_request)
    plan = plan_batches(
        capacity.concurrency,
        batch_size=options["batch_size"] if _user_set(options, user_keys, "batch_size") else None,
        max_concurrent_batches=options["max_concurrent_batches"]
        if _user_set(options, user_keys, "max_concurrent_batches")
        else None,
    )
    options["batch_size"] = plan.batch_size
    options["max_concurrent_batches"] = plan.max_concurrent_batches
    if "max_pending_requests" not in user_keys:
        options["max_pending_requests"] = plan.rows_in_flight
    for stage in ("chat_template_stage", "tokenize_stage", "detokenize_stage"):
        config = options.get(stage)
        if not isinstance(config, dict) or not config.get("enabled", True):
            continue
        if stage not in user_keys and "concurrency" not in config:
            options[stage] = {**config, "concurrency": GPU_STAGE_CONCURRENCY}
    description = {
        "accelerator": accelerator.name if accelerator else None,
        "engine_defaults_added": added,
        "max_num_seqs": capacity.max_num_seqs,
        "kv_tokens_estimate": capacity.kv_tokens,
        "concurrency": capacity.concurrency,
        "batch_size": plan.batch_size,
        "max_concurrent_batches": plan.max_concurrent_batches,
        "rows_in_flight": plan.rows_in_flight,
        "max_pending_requests": options.get("max_pending_requests"),
        "notes": list(plan.notes),
    }
    logger.info("engine sizing: %s", description)
    return options, description
