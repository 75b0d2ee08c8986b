"""Traffic between the versions of one endpoint: the route table, the weighted choice, the counters,
and the Ray Serve router application that applies them.

The router is an `OpenAiIngress` (Ray Serve LLM's own OpenAI front end) whose model handle is
picked per request from the route table, so errors, streaming and `/v1/models` behave exactly as
on a version's own URL. The table arrives as the deployment's `user_config`, and the deployment
keeps a fixed code version: a traffic shift is an in-place `reconfigure` of the running router
replicas (no restart, no dropped request), not a redeploy.

The weighted choice is a smooth weighted round robin, not a coin flip: 10% means exactly one
request in ten, so a canary step's share is what it says even over a few requests.
"""

# No `from __future__ import annotations` here: FastAPI reads the router's parameter annotations
# (request body models) at run time, from this module's globals.
import bisect
import hashlib
import hmac
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.compat import ray_private
from prefect_rayllm.rayllm_stages.config.base import StrictModel

VERSION_HEADER = "x-rayllm-version"
ROUTER_DEPLOYMENT = "EndpointRouter"
# Serve compares this to decide between an in-place reconfigure and new replicas: new router code
# (this file, and the ingress part in compat) must restart the routers, a new route table must not.
ROUTER_CODE_VERSION = (
    "router-" + hashlib.sha256(Path(__file__).read_bytes() + Path(ray_private.__file__).read_bytes()).hexdigest()[:12]
)
_STATS_WINDOW = 100_000  # samples kept per version
_WARM_TIMEOUT_S = 60.0


class VersionRoute(StrictModel):
    version: str
    app: str = Field(description="the Serve application hosting the version")
    deployment: str = Field(description="its LLMServer deployment")
    weight: int = Field(ge=0, le=100)


class RouteTable(StrictModel):
    """Which versions serve the endpoint and with which weights; `primary` is the promoted one."""

    model_id: str
    primary: str
    routes: list[VersionRoute] = Field(min_length=1)
    model_card: dict[str, Any] = Field(default_factory=dict, description="what /v1/models lists")
    lora_path: str | None = Field(None, description="dynamic LoRA loading path, for /v1/models")
    api_key_sha256: str | None = Field(None, description="digest of the endpoint's key (the key never leaves the driver)")

    @model_validator(mode="after")
    def _consistent(self) -> "RouteTable":
        versions = [r.version for r in self.routes]
        if len(set(versions)) != len(versions):
            raise ValueError(f"a version is routed twice: {versions}")
        if self.primary not in versions:
            raise ValueError(f"primary {self.primary!r} has no route")
        if sum(r.weight for r in self.routes) != 100:
            raise ValueError(f"weights must add up to 100 (got {self.weights})")
        return self

    @property
    def weights(self) -> dict[str, int]:
        return {r.version: r.weight for r in self.routes}

    def route(self, version: str) -> VersionRoute | None:
        return next((r for r in self.routes if r.version == version), None)


def shifted(
    table: RouteTable, weights: dict[str, int], routes: Sequence[VersionRoute] = (), primary: str | None = None
) -> RouteTable:
    """`table` with new weights and routes. A version left out of `weights` loses its route; one
    given 0 keeps it without traffic (the primary during a 100% canary step)."""
    known = {r.version: r for r in [*table.routes, *routes]}
    missing = sorted(set(weights) - set(known))
    if missing:
        raise ValueError(f"no route for version(s) {', '.join(missing)}")
    kept = [known[v].model_copy(update={"weight": w}).model_dump() for v, w in weights.items()]
    return RouteTable.model_validate({**table.model_dump(), "routes": kept, "primary": primary or table.primary})


class WeightedPicker:
    """Smooth weighted round robin (as in nginx): over any run of `sum(weights)` picks, each
    version is chosen exactly `weight` times, interleaved rather than in bursts."""

    def __init__(self, weights: dict[str, int]):
        self._weights = {v: w for v, w in weights.items() if w > 0}
        if not self._weights:
            raise ValueError("at least one version needs a weight above 0")
        self._total = sum(self._weights.values())
        self._current = dict.fromkeys(self._weights, 0)
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            for version, weight in self._weights.items():
                self._current[version] += weight
            chosen = max(self._current, key=self._current.__getitem__)
            self._current[chosen] -= self._total
            return chosen


@dataclass
class TrafficWindow:
    """What one version served in a time window."""

    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def percentile(self, q: float) -> float | None:
        return percentile(self.latencies_s, q)

    def merge(self, other: "TrafficWindow") -> "TrafficWindow":
        return TrafficWindow(self.requests + other.requests, self.errors + other.errors, self.latencies_s + other.latencies_s)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class TrafficStats:
    """Per version: when each request finished, how long it took, and whether it failed (5xx)."""

    def __init__(self, window: int = _STATS_WINDOW):
        self._samples: dict[str, deque[tuple[float, float, bool]]] = {}
        self._window = window

    def record(self, version: str, latency_s: float, ok: bool, at: float | None = None) -> None:
        self._samples.setdefault(version, deque(maxlen=self._window)).append((at or time.time(), latency_s, ok))

    def since(self, start: float) -> dict[str, dict[str, Any]]:
        """Samples that finished at or after `start` (wall clock), as plain dicts for the wire."""
        out = {}
        for version, samples in self._samples.items():
            recent = list(samples)[bisect.bisect_left([s[0] for s in samples], start) :]
            out[version] = {
                "requests": len(recent),
                "errors": sum(1 for s in recent if not s[2]),
                "latencies_s": [round(s[1], 4) for s in recent],
            }
        return out


def merge_stats(parts: list[dict[str, dict[str, Any]]]) -> dict[str, TrafficWindow]:
    """Combine the counters of several router replicas."""
    merged: dict[str, TrafficWindow] = {}
    for part in parts:
        for version, data in part.items():
            merged[version] = merged.get(version, TrafficWindow()).merge(TrafficWindow(**data))
    return merged


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def router_application(table: RouteTable, replicas: int = 1):
    """The Serve application of the endpoint's router, carrying `table` as its user_config.

    Deploying it again with another table reconfigures the running replicas in place.
    """
    from ray import serve

    router_cls = _router_class()
    deployment = serve.deployment(
        router_cls,
        name=ROUTER_DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=1000,
        # It holds no model; it must never wait for a CPU the engines hold. Its own (empty)
        # runtime_env: Serve otherwise gives it the deploying driver's job runtime_env, and a
        # driver with another one (another Prefect API URL) would restart the router mid-rollout.
        ray_actor_options={"num_cpus": 0, "runtime_env": {}},
    )
    # Without a fixed code version every deploy replaces the replicas, which is the restart a
    # traffic shift must avoid (`compat.ray_private.with_code_version`).
    return ray_private.with_code_version(deployment, ROUTER_CODE_VERSION, user_config=table.model_dump()).bind()


def _router_class():
    import asyncio
    import contextvars
    import logging

    from fastapi import Request, status
    from ray import serve
    from ray.serve.llm.ingress import make_fastapi_ingress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
    from starlette.responses import Response

    routed_ingress = ray_private.version_routed_ingress()
    openai_error = ray_private.openai_http_exception()

    class EndpointRouter(routed_ingress):  # type: ignore[valid-type, misc]
        """OpenAI front end of one endpoint: each request goes to one version by weight."""

        def __init__(self):
            super().__init__()
            self._table: RouteTable | None = None
            self._picker: WeightedPicker | None = None
            self._handles: dict[str, Any] = {}
            self._stats = TrafficStats()
            # The version picked for the request being handled; created here, since the class
            # travels to the replica pickled and a ContextVar cannot be pickled.
            self._chosen: contextvars.ContextVar[str] = contextvars.ContextVar("rayllm_version")

        async def reconfigure(self, config: dict[str, Any]) -> None:
            table = RouteTable.model_validate(config)
            handles = {}
            for r in table.routes:
                handles[r.version] = self._handles.get(r.version) or await _warm(
                    serve.get_deployment_handle(r.deployment, app_name=r.app)
                )
            # Swap everything at once: a request in flight keeps the handle it already chose.
            self.serve_model(table.model_id, table.model_card or _default_card(table.model_id), table.lora_path)
            self._handles = handles
            self._picker, self._table = WeightedPicker(table.weights), table

        def table(self) -> dict[str, Any] | None:
            return self._table.model_dump() if self._table else None

        def stats(self, since: float) -> dict[str, dict[str, Any]]:
            return self._stats.since(since)

        def chosen_route(self) -> tuple[str, Any]:
            version = self._chosen.get()
            return version, self._handles[version]

        def _authorize(self, request: Request) -> None:
            digest = self._table.api_key_sha256 if self._table else None
            if digest is None:
                return
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not token or not hmac.compare_digest(key_digest(token), digest):
                raise openai_error(status.HTTP_401_UNAUTHORIZED, "invalid or missing API key", type="AuthenticationError")

        async def models(self, request: Request):
            self._authorize(request)
            return await super().models()

        async def model_data(self, model: str, request: Request):
            self._authorize(request)
            return await super().model_data(model)

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
            return await self._routed(body, "chat", request)

        async def completions(self, body: CompletionRequest, request: Request) -> Response:
            return await self._routed(body, "completions", request)

        async def _routed(self, body, method: str, request: Request) -> Response:
            self._authorize(request)
            if self._picker is None:
                raise openai_error(status.HTTP_503_SERVICE_UNAVAILABLE, "the endpoint has no route yet")
            version = self._picker.pick()
            token = self._chosen.set(version)
            start, ok = time.monotonic(), False
            try:
                response = await self.forward(body, method, request)
                ok = True
            except openai_error as exc:
                ok = exc.status_code < 500  # a client's bad request is not the version's failure
                raise
            finally:
                self._chosen.reset(token)
                self._stats.record(version, time.monotonic() - start, ok)
            response.headers[VERSION_HEADER] = version
            return response

    async def _warm(handle):
        # A new handle learns its replicas on its first call (seconds here): make that call now,
        # while the old table still routes, so no client request waits for it.
        try:
            await asyncio.wait_for(handle.check_health.remote(), timeout=_WARM_TIMEOUT_S)
        except Exception as exc:  # the candidate was checked before it got traffic; do not block on this
            logging.getLogger(__name__).warning("warming the handle to %s failed: %s", handle.deployment_name, exc)
        return handle

    return make_fastapi_ingress(EndpointRouter, endpoint_map=_OPENAI_ROUTES)


# OpenAI's routes, as Ray's own ingress serves them, for the methods the router answers.
_OPENAI_ROUTES = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
}


def _default_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "owned_by": "organization-owner", "permission": [], "metadata": {}}
