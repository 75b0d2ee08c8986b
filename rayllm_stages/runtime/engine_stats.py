"""How full the engine was: running requests, KV-cache use and decode rate over time, from vLLM's own
per-request timings, and the decode rate against the GPU's memory-bandwidth roofline.

Every finished vLLM request carries its engine timestamps (`RequestStateStats`: arrival, queued,
scheduled, first and last token). `engine_timing` keeps them as durations in the row's per-step
usage (`usage_json`); `EngineTrace` folds rows into fixed time buckets as they reach the driver (its
memory grows with the run's length, not its rows), and `summary` reports, over the steady part of
the run (from 10% to 90% of the generated tokens):

- running and waiting requests (mean, max) against the engine's `max_num_seqs`;
- KV-cache tokens in use (each running request counted at its prompt plus half its output) against
  the engine's KV capacity (reported by the engine, else estimated);
- decode tokens/s, and the roofline: a decode step reads every weight once plus the KV cache of
  every running request, so at batch B and mean context L one replica produces at most
  B / ((weight bytes + B * L * KV bytes per token) / memory bandwidth) tokens/s. The efficiency is
  the achieved rate over that ceiling.

Example:
    >>> trace = EngineTrace()
    >>> trace.add(arrival=0.0, wait_s=0.0, prefill_s=0.1, decode_s=1.0, prompt_tokens=100, output_tokens=64)
    >>> trace.summary()["requests"]
    1
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prefect_rayllm.rayllm_stages.llm.capacity import Accelerator, ModelShape

BUCKET_S = 0.5
SERIES_POINTS = 60


def engine_timing(metrics: Any) -> dict[str, float] | None:
    """Durations of one finished request from Ray's `metrics` column (vLLM `RequestStateStats`, with
    the capacity `engine_hooks` adds), or None when the engine recorded none.

    `arrival` is when the engine queued the request, on the wall clock: the engine's monotonic
    queue time plus its host's clock offset when `engine_hooks` recorded it, else the front end's
    arrival time (which runs ahead of the queue time by however long the front end took).
    """
    if not isinstance(metrics, dict):
        return None
    try:
        arrival = float(metrics["arrival_time"])
        queued, scheduled = float(metrics["queued_ts"]), float(metrics["scheduled_ts"])
        first, last = float(metrics["first_token_ts"]), float(metrics["last_token_ts"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (arrival > 0 and queued > 0 and scheduled >= queued and first >= scheduled and last >= first):
        return None
    offset = metrics.get("rayllm_clock_offset")
    if offset:  # the engine host's clock (engine_hooks): every request on one time line
        arrival = queued + float(offset)
    timing = {
        "arrival": round(arrival, 4),
        "wait_s": round(scheduled - queued, 4),
        "prefill_s": round(first - scheduled, 4),
        "decode_s": round(last - first, 4),
    }
    for key, name in (("rayllm_max_num_seqs", "max_num_seqs"), ("rayllm_kv_tokens", "kv_tokens")):
        value = metrics.get(key)
        if value:
            timing[name] = int(value)
    return timing


class _Buckets:
    """Time-weighted sums over fixed buckets: `add(start, end, weight)` adds `weight` per second of
    overlap with each bucket, in O(1) (a difference array for whole buckets, partial ends apart)."""

    def __init__(self, width: float):
        self.width = width
        self.partial: dict[int, float] = defaultdict(float)
        self.whole: dict[int, float] = defaultdict(float)

    def add(self, start: float, end: float, weight: float) -> None:
        if end <= start or weight == 0:
            return
        first, last = int(start // self.width), int(end // self.width)
        if first == last:
            self.partial[first] += weight * (end - start)
            return
        self.partial[first] += weight * ((first + 1) * self.width - start)
        self.partial[last] += weight * (end - last * self.width)
        if last > first + 1:
            self.whole[first + 1] += weight
            self.whole[last] -= weight

    def absorb(self, other: _Buckets) -> None:
        for mine, theirs in ((self.partial, other.partial), (self.whole, other.whole)):
            for index, value in theirs.items():
                mine[index] += value

    def averages(self, first: int, last: int) -> list[float]:
        """Mean value per bucket (integral / width) for buckets first..last."""
        out, level = [], 0.0
        for index in range(min(self.whole, default=first), first):
            level += self.whole.get(index, 0.0)
        for index in range(first, last + 1):
            level += self.whole.get(index, 0.0)
            out.append(level + self.partial.get(index, 0.0) / self.width)
        return out


@dataclass
class _Extent:
    start: float = math.inf
    end: float = -math.inf


class EngineTrace:
    """Running and waiting requests, KV tokens and generated tokens over time, for one engine step."""

    def __init__(self, bucket_s: float = BUCKET_S):
        self.bucket_s = bucket_s
        self.running = _Buckets(bucket_s)
        self.waiting = _Buckets(bucket_s)
        self.kv_tokens = _Buckets(bucket_s)
        self.generated = _Buckets(bucket_s)
        self.extent = _Extent()
        self.requests = 0
        self.tokens_out = 0
        self.max_num_seqs: int | None = None
        self.kv_capacity: int | None = None

    def add(
        self,
        *,
        arrival: float,
        wait_s: float,
        prefill_s: float,
        decode_s: float,
        prompt_tokens: int,
        output_tokens: int,
        max_num_seqs: int | None = None,
        kv_tokens: int | None = None,
    ) -> None:
        scheduled = arrival + wait_s
        first = scheduled + prefill_s
        last = first + decode_s
        self.requests += 1
        self.tokens_out += output_tokens
        self.extent.start = min(self.extent.start, arrival)
        self.extent.end = max(self.extent.end, last)
        self.waiting.add(arrival, scheduled, 1.0)
        self.running.add(scheduled, max(last, scheduled + 1e-6), 1.0)
        self.kv_tokens.add(scheduled, max(last, scheduled + 1e-6), prompt_tokens + output_tokens / 2)
        if output_tokens:
            span = max(last - first, 1e-6)
            self.generated.add(first, first + span, output_tokens / span)
        self.max_num_seqs = max_num_seqs or self.max_num_seqs
        self.kv_capacity = kv_tokens or self.kv_capacity

    def absorb(self, other: EngineTrace) -> None:
        """Add another trace of the same engine (e.g. one block's, folded by a worker)."""
        for name in ("running", "waiting", "kv_tokens", "generated"):
            getattr(self, name).absorb(getattr(other, name))
        self.requests += other.requests
        self.tokens_out += other.tokens_out
        self.extent.start = min(self.extent.start, other.extent.start)
        self.extent.end = max(self.extent.end, other.extent.end)
        self.max_num_seqs = other.max_num_seqs or self.max_num_seqs
        self.kv_capacity = other.kv_capacity or self.kv_capacity

    def add_timing(self, timing: dict[str, Any], prompt_tokens: int, output_tokens: int) -> None:
        """One request from `engine_timing`'s dict."""
        self.add(
            arrival=timing["arrival"],
            wait_s=timing["wait_s"],
            prefill_s=timing["prefill_s"],
            decode_s=timing["decode_s"],
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            max_num_seqs=timing.get("max_num_seqs"),
            kv_tokens=timing.get("kv_tokens"),
        )

    def summary(self, kv_capacity_estimate: int | None = None) -> dict[str, Any]:
        """Means over the steady window (10% -> 90% of generated tokens), maxima, and a series."""
        if not self.requests:
            return {"requests": 0}
        width = self.bucket_s
        first, last = int(self.extent.start // width), int(self.extent.end // width)
        running = self.running.averages(first, last)
        waiting = self.waiting.averages(first, last)
        kv = self.kv_tokens.averages(first, last)
        rate = self.generated.averages(first, last)
        cumulative, total = [], 0.0
        for value in rate:
            total += value * width
            cumulative.append(total)
        low = _crossing(cumulative, 0.1 * total)
        high = max(_crossing(cumulative, 0.9 * total), low)
        window = slice(low, high + 1)
        t10 = (first + low) * width + _within(cumulative, low, 0.1 * total, rate, width)
        t90 = (first + high) * width + _within(cumulative, high, 0.9 * total, rate, width)
        t10 = max(t10, self.extent.start)
        t90 = min(max(t90, t10), self.extent.end)
        steady_s = max(t90 - t10, 1e-3)
        capacity = self.kv_capacity or kv_capacity_estimate
        running_mean = _mean(running[window])
        kv_mean = _mean(kv[window])
        summary: dict[str, Any] = {
            "requests": self.requests,
            "tokens_out": self.tokens_out,
            "first_request_at": round(self.extent.start, 3),
            "engine_span_s": round(self.extent.end - self.extent.start, 3),
            "steady_window_s": [round(t10 - self.extent.start, 2), round(t90 - self.extent.start, 2)],
            "decode_tokens_per_s": round(0.8 * total / steady_s, 1),
            "running": {"mean": round(running_mean, 1), "max": round(max(running), 1), "max_num_seqs": self.max_num_seqs},
            "waiting": {"mean": round(_mean(waiting[window]), 1), "max": round(max(waiting), 1)},
            "kv_cache": {
                "tokens_mean": round(kv_mean),
                "tokens_max": round(max(kv)),
                "capacity_tokens": capacity,
                "capacity_source": "engine" if self.kv_capacity else ("estimate" if capacity else None),
                "use_mean": round(kv_mean / capacity, 4) if capacity else None,
                "use_max": round(max(kv) / capacity, 4) if capacity else None,
            },
            "context_tokens_mean": round(kv_mean / running_mean, 1) if running_mean else None,
            "series": _series(first, width, self.extent.start, running, waiting, rate, kv, capacity),
        }
        return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _crossing(cumulative: list[float], target: float) -> int:
    for index, value in enumerate(cumulative):
        if value >= target:
            return index
    return len(cumulative) - 1


def _within(cumulative: list[float], index: int, target: float, rate: list[float], width: float) -> float:
    """Seconds into bucket `index` at which the cumulative count reaches `target`."""
    before = cumulative[index - 1] if index > 0 else 0.0
    per_s = rate[index]
    return min(width, max(0.0, (target - before) / per_s)) if per_s > 0 else 0.0


def _series(
    first: int,
    width: float,
    start: float,
    running: list[float],
    waiting: list[float],
    rate: list[float],
    kv: list[float],
    capacity: int | None,
) -> dict[str, list[float]]:
    step = max(1, math.ceil(len(running) / SERIES_POINTS))

    def pooled(values: list[float]) -> list[float]:
        return [round(_mean(values[i : i + step]), 1) for i in range(0, len(values), step)]

    series = {
        "t_s": [round((first + i) * width - start, 1) for i in range(0, len(running), step)],
        "running": pooled(running),
        "waiting": pooled(waiting),
        "decode_tokens_per_s": pooled(rate),
    }
    if capacity:
        series["kv_use_pct"] = [round(100 * v / capacity, 2) for v in pooled(kv)]
    return series


def decode_roofline(
    shape: ModelShape,
    accelerator: Accelerator,
    running: float,
    context_tokens: float,
    *,
    replicas: int = 1,
    gpus_per_replica: int = 1,
) -> dict[str, Any] | None:
    """The memory-bandwidth ceiling on decode tokens/s at `running` requests (over all replicas) of
    mean context `context_tokens`: each step of a replica reads its weights once and the KV cache of
    its running requests; its GPUs read in parallel."""
    if not accelerator.bandwidth_bytes_per_s or running <= 0:
        return None
    batch = running / replicas
    kv_bytes = batch * context_tokens * shape.kv_bytes_per_token
    step_s = (shape.weight_bytes + kv_bytes) / (accelerator.bandwidth_bytes_per_s * gpus_per_replica)
    return {
        "accelerator": accelerator.name,
        "bandwidth_tb_per_s": round(accelerator.bandwidth_bytes_per_s / 1e12, 3),
        "gpus": replicas * gpus_per_replica,
        "weights_gb": round(shape.weight_bytes / 1e9, 2),
        "kv_gb_per_step": round(kv_bytes / 1e9, 3),
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(replicas * batch / step_s, 1),
    }


def efficiency(summary: dict[str, Any], roofline: dict[str, Any] | None) -> float | None:
    if not roofline or not roofline.get("tokens_per_s"):
        return None
    return round(summary["decode_tokens_per_s"] / roofline["tokens_per_s"], 4)


class EngineTraces:
    """One `EngineTrace` per LLM step, fed from result rows' `usage_json` (by the workers that commit
    them, one trace per block, absorbed by the driver)."""

    def __init__(self) -> None:
        self.steps: dict[str, EngineTrace] = {}

    def observe(self, usage_json: str | None) -> None:
        if not usage_json:
            return
        try:
            usage = json.loads(usage_json)
        except (TypeError, json.JSONDecodeError):
            return
        for step, entry in usage.items():
            timing = entry.get("engine") if isinstance(entry, dict) else None
            if timing:
                trace = self.steps.setdefault(step, EngineTrace())
                trace.add_timing(timing, int(entry.get("in") or 0), int(entry.get("out") or 0))

    def absorb(self, other: EngineTraces) -> None:
        for step, trace in other.steps.items():
            self.steps.setdefault(step, EngineTrace(trace.bucket_s)).absorb(trace)

    def report(self, models: dict[str, Any]) -> dict[str, Any] | None:
        """Per step: `EngineTrace.summary` plus the roofline and efficiency; `models` maps step name to
        its `ModelSpec`. None when no step recorded engine timings (HTTP, Serve, or old Ray)."""
        if not self.steps:
            return None
        return {name: engine_report(trace, models.get(name)) for name, trace in self.steps.items()}


def engine_report(trace: EngineTrace, spec: Any = None, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """`trace.summary()` with the roofline for `spec`'s model on the cluster's GPU (when known)."""
    from prefect_rayllm.rayllm_stages.llm.capacity import detect_accelerator, estimate_kv_tokens, read_model_shape

    shape = (
        read_model_shape(spec.source, spec.engine_kwargs)
        if spec is not None and getattr(spec, "engine", "vllm") == "vllm"
        else None
    )
    accelerator = accelerator or (detect_accelerator() if shape else None)
    estimate = estimate_kv_tokens(shape, accelerator, spec.engine_kwargs) if shape and accelerator else None
    summary = trace.summary(kv_capacity_estimate=estimate)
    roofline = None
    if shape and accelerator and summary.get("context_tokens_mean"):
        kwargs = spec.engine_kwargs
        replicas = spec.replica_bounds[1]
        roofline = decode_roofline(
            shape,
            accelerator,
            summary["running"]["mean"],
            summary["context_tokens_mean"],
            replicas=replicas,
            gpus_per_replica=int(kwargs.get("tensor_parallel_size", 1)) * int(kwargs.get("pipeline_parallel_size", 1)),
        )
    summary["roofline"] = roofline
    summary["roofline_efficiency"] = efficiency(summary, roofline)
    return summary


def efficiency_line(report: dict[str, Any]) -> str:
    """One line for people: how full the engine was and how close decode came to the roofline."""
    running, kv = report.get("running") or {}, report.get("kv_cache") or {}
    parts = [f"{report.get('decode_tokens_per_s', 0):,.0f} decode tok/s"]
    if running:
        seqs = f" of {running['max_num_seqs']}" if running.get("max_num_seqs") else ""
        parts.append(f"running {running['mean']:g} mean / {running['max']:g} max{seqs}")
    if kv.get("use_mean") is not None:
        parts.append(f"KV {100 * kv['use_mean']:.1f}% mean ({kv['capacity_source']} capacity)")
    roofline = report.get("roofline")
    if roofline and report.get("roofline_efficiency") is not None:
        parts.append(
            f"{100 * report['roofline_efficiency']:.0f}% of the {roofline['tokens_per_s']:,.0f} tok/s "
            f"bandwidth roofline ({roofline['accelerator']}, {roofline['bandwidth_tb_per_s']} TB/s)"
        )
    return "; ".join(parts)


def with_engine_timing(result: dict[str, Any], step_name: str, metrics: Any) -> dict[str, Any]:
    """`result` with this step's engine timing (`engine_timing`) added to its `usage_json` entry."""
    timing = engine_timing(metrics)
    if timing is None or not result.get("usage_json"):
        return result
    usage = json.loads(result["usage_json"])
    if isinstance(usage.get(step_name), dict):
        usage[step_name]["engine"] = timing
        result = {**result, "usage_json": json.dumps(usage)}
    return result
