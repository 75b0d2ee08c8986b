"""Endpoint lifecycle on Ray Serve LLM: versions side by side behind one stable router.

Each model version is its own Serve application (`<endpoint>-<version>`, built with
`build_openai_app`) at its own route (`<route_prefix>-<version>`), so a candidate can be checked on
its own URL before any user sees it. The endpoint's router application (named `<endpoint>`, at
`<route_prefix>`) forwards each request to a version by weight (`traffic.py`). Every function here
is idempotent: it reads Serve's state first and does only what is missing, so a retried task, or a
rollout rerun after a crash, converges instead of failing or doubling anything.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from pydantic import Field

from prefect_rayllm.rayllm_stages.compat import ray_private
from prefect_rayllm.rayllm_stages.config.base import StrictModel
from prefect_rayllm.rayllm_stages.llm.serve_engine import app_status, delete_engine, llm_config, serve_running, wait_until_running
from prefect_rayllm.rayllm_stages.rollout.config import HttpOptions, RolloutConfig, SmokePrompt
from prefect_rayllm.rayllm_stages.rollout.traffic import (
    ROUTER_DEPLOYMENT,
    VERSION_HEADER,
    RouteTable,
    TrafficWindow,
    VersionRoute,
    key_digest,
    merge_stats,
    router_application,
    shifted,
)

logger = logging.getLogger(__name__)

_POLL_S = 1.0


class ServeProxyMissing(RuntimeError):
    """Serve runs on the cluster without the HTTP proxy (or on another port) that an endpoint needs."""


class CandidateRejected(RuntimeError):
    """A check measured the candidate, and the candidate failed it: a verdict, never retried."""


class CheckUnmeasured(RuntimeError):
    """A check could not be measured (no answer at all, a timeout, too little traffic to judge):
    no verdict on the candidate. Worth another try; if none measures, the rollout is inconclusive."""


class HealthCheckFailed(CandidateRejected):
    """A version did not become RUNNING and list its model in time."""


class SmokeTestFailed(CandidateRejected):
    """A golden prompt got an empty reply, a late one, an HTTP error, or one that does not match."""


class CanaryCheckFailed(CandidateRejected):
    """The candidate failed a canary step's checks (error rate, latency, probes)."""


class VersionInfo(StrictModel):
    """One deployed version of an endpoint and where to reach it."""

    version: str
    app: str
    route_prefix: str
    url: str = Field(description="OpenAI base URL of this version alone (…/v1)")
    deployed_here: bool = False


class SmokeResult(StrictModel):
    prompt: str
    ok: bool
    latency_s: float
    reply: str | None = None
    reason: str | None = None
    measured: bool = Field(True, description="False when no HTTP answer came back (refused, reset, timed out)")


class EndpointStatus(StrictModel):
    endpoint: str
    url: str | None
    router: str | None = Field(description="router application status, None when there is no router")
    primary: str | None
    weights: dict[str, int] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict, description="version app -> Serve status")


# -- Serve and its HTTP proxy ------------------------------------------------------------------
def ensure_serve_http(http: HttpOptions) -> None:
    """Start Serve with its HTTP proxy on `http.host:http.port`, or check the running one has it.

    Batch jobs start Serve without a proxy (they need no HTTP); an endpoint cannot live there.

    Raises:
        ServeProxyMissing: Serve already runs without a proxy, or with one on another port.
    """
    from ray import serve

    if not serve_running():
        serve.start(http_options={"host": http.host, "port": http.port})
        return
    if not serve.status().proxies:
        raise ServeProxyMissing(
            "Ray Serve already runs on this cluster without an HTTP proxy (a batch job's shared engine starts it "
            "that way), so an endpoint would be unreachable. Stop Serve first (`serve shutdown`, or "
            "`ray.serve.shutdown()`) when no job uses it, then roll out again."
        )
    port = ray_private.serve_http_port()
    if port is not None and port != http.port:
        raise ServeProxyMissing(
            f"Ray Serve's HTTP proxy listens on port {port}, not on http.port {http.port}; set http.port: {port} "
            "(one Serve instance has one proxy port)"
        )


# -- versions ----------------------------------------------------------------------------------
def version_info(config: RolloutConfig, version: str, deployed_here: bool = False) -> VersionInfo:
    route = f"{config.route}-{version}"
    return VersionInfo(
        version=version,
        app=f"{config.endpoint}-{version}",
        route_prefix=route,
        url=f"{config.http.base_url}{route}/v1",
        deployed_here=deployed_here,
    )


def version_apps(endpoint: str) -> dict[str, str]:
    """The endpoint's version applications and their Serve status."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:
        return {}
    prefix = f"{endpoint}-v-"
    return {name: str(getattr(app.status, "value", app.status)) for name, app in applications.items() if name.startswith(prefix)}


def serving_llm_config(config: RolloutConfig, gpu: bool, replicas: tuple[int, int] | None = None):
    """The `LLMConfig` of the candidate: our engine defaults, the stable model name, the
    autoscaling bounds (`replicas` overrides them) and the LoRA config passed through to Ray Serve LLM."""
    from ray.serve.llm import LLMConfig

    base = llm_config(config.served_spec(), gpu)
    data = base.model_dump(exclude_unset=True)
    deployment = dict(data.get("deployment_config") or {})
    deployment["autoscaling_config"] = {**deployment.get("autoscaling_config", {}), **config.autoscaling}
    if replicas is not None:
        deployment["autoscaling_config"].update(min_replicas=replicas[0], max_replicas=replicas[1])
    data["deployment_config"] = deployment
    if config.lora_config is not None:
        data["lora_config"] = config.lora_config
    return LLMConfig.model_validate(data)


def deploy_version(config: RolloutConfig, gpu: bool) -> VersionInfo:
    """Deploy the candidate as its own application, unless it already runs or is deploying.

    A version that failed before is deleted and deployed again.
    """
    ensure_serve_http(config.http)
    info = version_info(config, config.version_id())
    status = app_status(info.app)
    state = _state(status)
    if state in ("RUNNING", "DEPLOYING"):
        logger.info("version %s of %s is already %s: reusing it", info.version, config.endpoint, state)
        return info
    if state is not None:
        logger.warning("version %s of %s is %s: deploying it again", info.version, config.endpoint, state)
        delete_engine(info.app)
    logger.info(
        "deploying version %s of %s (%s) at %s", info.version, config.endpoint, config.candidate.source, info.route_prefix
    )
    app = version_application(config, gpu)
    # `serve.run` waits for RUNNING without a timeout; the health step waits instead, with one,
    # after the deploy task is recorded, so that a version that never starts is rolled back.
    _run_without_waiting(app, info)
    return info.model_copy(update={"deployed_here": True})


def version_application(config: RolloutConfig, gpu: bool, replicas: tuple[int, int] | None = None):
    """The version's Serve application (`build_openai_app`), its engine deployment pinned to the
    version id as Serve's code version.

    Serve restarts every replica of an unversioned deployment on each redeploy; pinned, a redeploy
    that changes only autoscaling (`scale_version`) updates the running replicas in place.
    Ray 2.60 offers no public way to set it (`compat.ray_private.pin_openai_app_version` says why).
    """
    from ray.serve.llm import build_openai_app

    app = build_openai_app({"llm_configs": [serving_llm_config(config, gpu, replicas)]})
    return ray_private.pin_openai_app_version(app, config.version_id())


def _run_without_waiting(app, info: VersionInfo) -> None:
    """Deploy `app` as the version's application; return once Serve took it, not once it runs."""
    from ray import serve

    serve.run_many([serve.RunTarget(app, name=info.app, route_prefix=info.route_prefix)], wait_for_applications_running=False)


def scale_version(config: RolloutConfig, min_replicas: int, max_replicas: int, gpu: bool) -> VersionInfo:
    """Set the autoscaling bounds of the running version `config` describes; its engine replicas
    keep serving (no restart, no model reload). Idempotent.

    Raises:
        ValueError: bad bounds, or that version is not running on this cluster.
    """
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError(f"replicas: need 0 <= min ({min_replicas}) <= max ({max_replicas}) and max >= 1")
    info = version_info(config, config.version_id())
    state = _state(app_status(info.app))
    if state != "RUNNING":
        running = ", ".join(version_apps(config.endpoint)) or "none"
        raise ValueError(
            f"version {info.version} of {config.endpoint} is {state or 'not deployed'}: scale a running "
            f"version with the config that deployed it (running versions: {running})"
        )
    logger.info("scaling %s to %d..%d replicas", info.app, min_replicas, max_replicas)
    app = version_application(config, gpu, replicas=(min_replicas, max_replicas))
    _run_without_waiting(app, info)
    wait_until_running(info.app, config.timeouts.deploy_s)
    return info


def wait_healthy(info: VersionInfo, model_id: str, timeout_s: float, api_key: str | None = None) -> float:
    """Wait until the version's app is RUNNING and its `/v1/models` lists `model_id`; returns seconds.

    Raises:
        HealthCheckFailed: Serve reports a failure, or the model is not listed in `timeout_s`.
    """
    from prefect_rayllm.rayllm_stages.llm.serve_engine import EngineDeployFailed

    start = time.monotonic()
    try:
        wait_until_running(info.app, timeout_s)
    except EngineDeployFailed as exc:
        raise HealthCheckFailed(str(exc)) from exc
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            status, _, body = http_json("GET", f"{info.url}/models", api_key=api_key, timeout_s=10)
            listed = [m.get("id") for m in (body or {}).get("data", [])]
            if status == 200 and model_id in listed:
                return round(time.monotonic() - start, 2)
            last = f"HTTP {status}, models {listed}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(_POLL_S)
    raise HealthCheckFailed(f"{info.url}/models did not list {model_id!r} within {timeout_s:.0f} s (last: {last})")


# -- checks --------------------------------------------------------------------------------------
def http_json(
    method: str, url: str, body: dict[str, Any] | None = None, api_key: str | None = None, timeout_s: float = 60.0
) -> tuple[int, dict[str, str], Any]:
    """One JSON request; returns status, headers and the decoded body (HTTP errors are returned)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = raw.decode(errors="replace")[:500]
        return exc.code, dict(exc.headers or {}), decoded


def ask(base_url: str, model_id: str, prompt: SmokePrompt, api_key: str | None, timeout_s: float) -> SmokeResult:
    """Send one golden prompt and judge the reply."""
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt.prompt}],
        "max_tokens": prompt.max_tokens,
        "temperature": 0.0,
    }
    if prompt.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "smoke", "schema": prompt.json_schema}}
    start = time.monotonic()
    try:
        status, _, reply = http_json("POST", f"{base_url}/chat/completions", body, api_key, timeout_s)
    except OSError as exc:  # refused, reset, timed out: nothing was measured
        return SmokeResult(
            prompt=prompt.prompt,
            ok=False,
            latency_s=round(time.monotonic() - start, 3),
            reason=f"no answer: {type(exc).__name__}: {exc}",
            measured=False,
        )
    latency = round(time.monotonic() - start, 3)
    if status != 200:
        return SmokeResult(prompt=prompt.prompt, ok=False, latency_s=latency, reason=f"HTTP {status}: {str(reply)[:200]}")
    text = ((reply.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
    return SmokeResult(
        prompt=prompt.prompt,
        ok=(reason := _judge(prompt, text, latency)) is None,
        latency_s=latency,
        reply=text[:200],
        reason=reason,
    )


def _judge(prompt: SmokePrompt, text: str, latency_s: float) -> str | None:
    if not text.strip():
        return "empty reply"
    if latency_s > prompt.max_latency_s:
        return f"took {latency_s:.2f} s, above max_latency_s {prompt.max_latency_s}"
    if prompt.expect is not None and prompt.expect not in text:
        return f"reply does not contain {prompt.expect!r}"
    if prompt.json_schema is not None:
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), prompt.json_schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            return f"reply is not JSON matching the schema: {str(exc).splitlines()[0][:200]}"
    return None


def smoke_test(
    base_url: str, model_id: str, prompts: list[SmokePrompt], api_key: str | None = None, timeout_s: float = 60.0
) -> list[SmokeResult]:
    """Every golden prompt against `base_url`.

    Raises:
        SmokeTestFailed: a prompt got an answer that fails it; the message names each one and why.
        CheckUnmeasured: no prompt failed on its answer, but some got no answer at all.
    """
    results = [ask(base_url, model_id, prompt, api_key, timeout_s) for prompt in prompts]
    failed = [r for r in results if r.measured and not r.ok]
    if failed:
        raise SmokeTestFailed(
            f"{len(failed)} of {len(results)} smoke prompts failed: " + "; ".join(f"{r.prompt!r}: {r.reason}" for r in failed)
        )
    unanswered = [r for r in results if not r.measured]
    if unanswered:
        raise CheckUnmeasured(
            f"{len(unanswered)} of {len(results)} smoke prompts got no answer from {base_url}: "
            + "; ".join(f"{r.prompt!r}: {r.reason}" for r in unanswered)
        )
    return results


# -- the router ----------------------------------------------------------------------------------
def read_table(endpoint: str) -> RouteTable | None:
    """The route table the running router applies, or None when the endpoint has no router yet."""
    from ray import serve

    if _state(app_status(endpoint)) is None:
        return None
    data = serve.get_app_handle(endpoint).table.remote().result(timeout_s=30)
    return RouteTable.model_validate(data) if data else None


def _route(info: VersionInfo, model_id: str, weight: int) -> VersionRoute:
    # build_openai_app names the engine deployment "LLMServer:<model id, / and . replaced>".
    deployment = "LLMServer:" + model_id.replace("/", "--").replace(".", "_")
    return VersionRoute(version=info.version, app=info.app, deployment=deployment, weight=weight)


def apply_table(config: RolloutConfig, table: RouteTable) -> RouteTable:
    """Deploy the router with `table`, or reconfigure the running one in place; returns once every
    router replica applies it."""
    from ray import serve

    ensure_serve_http(config.http)
    serve.run(router_application(table, config.router_replicas), name=config.endpoint, route_prefix=config.route, blocking=False)
    wait_until_running(config.endpoint, config.timeouts.deploy_s)
    return table


def set_traffic(
    config: RolloutConfig,
    weights: dict[str, int],
    gpu: bool,
    candidate: VersionInfo | None = None,
    primary: str | None = None,
    api_key: str | None = None,
) -> RouteTable:
    """Route `weights` (version -> percent, adding up to 100) through the endpoint's router.

    The first call for an endpoint creates its router; later ones reconfigure it in place.
    """
    routes = [_route(candidate, config.model_id, 0)] if candidate is not None else []
    existing = current = read_table(config.endpoint)
    if current is None:
        if candidate is None:
            raise ValueError(f"endpoint {config.endpoint!r} has no router yet: the first traffic needs a candidate")
        card = ray_private.openai_model_card(config.model_id, serving_llm_config(config, gpu))
        current = RouteTable(
            model_id=config.model_id,
            primary=candidate.version,
            routes=[routes[0].model_copy(update={"weight": 100})],
            model_card=card,
            lora_path=(config.lora_config or {}).get("dynamic_lora_loading_path"),
        )
    table = shifted(current, weights, routes, primary)
    table = table.model_copy(update={"api_key_sha256": key_digest(api_key) if api_key else None})
    if existing is not None and table == existing:
        return table  # already applied (a retried task)
    logger.info("endpoint %s: traffic %s (primary %s)", config.endpoint, table.weights, table.primary)
    return apply_table(config, table)


def router_stats(endpoint: str, since: float) -> dict[str, TrafficWindow]:
    """What each version served through the router since `since` (wall clock), all replicas merged."""
    from ray import serve

    handle = serve.get_deployment_handle(ROUTER_DEPLOYMENT, app_name=endpoint)
    try:
        return merge_stats(ray_private.broadcast(handle, "stats", args=(since,)))
    except ray_private.RayCompatError:
        raise
    except Exception as exc:  # a replica did not answer: one replica's counters are still an answer
        logger.debug("broadcast to the router failed (%s); asking one replica", exc)
        return merge_stats([handle.stats.remote(since).result(timeout_s=30)])


def promote(config: RolloutConfig, candidate: VersionInfo, gpu: bool, api_key: str | None = None) -> list[str]:
    """Send all traffic to `candidate`, make it the primary, and delete every other version.

    Returns the deleted applications.
    """
    set_traffic(config, {candidate.version: 100}, gpu, candidate=candidate, primary=candidate.version, api_key=api_key)
    time.sleep(config.timeouts.drain_s)  # requests the old version already took finish first
    old = [app for app in version_apps(config.endpoint) if app != candidate.app]
    for app in old:
        delete_engine(app)
    return old


def rollback(config: RolloutConfig, candidate: VersionInfo, gpu: bool, api_key: str | None = None) -> str | None:
    """Restore the primary version's full traffic and delete the candidate; returns the primary.

    Safe at any point of a rollout: before the router exists, after a partial shift, or twice.
    """
    table = read_table(config.endpoint)
    primary = table.primary if table is not None else None
    if primary == candidate.version:
        logger.warning("endpoint %s: %s is the primary version; nothing to roll back", config.endpoint, primary)
        return primary
    if table is not None and candidate.version in table.weights:
        set_traffic(config, {table.primary: 100}, gpu, api_key=api_key)
        time.sleep(config.timeouts.drain_s)
    delete_engine(candidate.app)
    return primary


def teardown(endpoint: str) -> list[str]:
    """Delete the endpoint's router, then all its versions; returns what was deleted."""
    deleted = []
    if _state(app_status(endpoint)) is not None:
        delete_engine(endpoint)
        deleted.append(endpoint)
    for app in version_apps(endpoint):
        delete_engine(app)
        deleted.append(app)
    return deleted


def endpoint_status(endpoint: str, http: HttpOptions | None = None, route_prefix: str | None = None) -> EndpointStatus:
    router = _state(app_status(endpoint))
    table = read_table(endpoint) if router == "RUNNING" else None
    url = f"{http.base_url}{route_prefix or '/' + endpoint}/v1" if http is not None else None
    return EndpointStatus(
        endpoint=endpoint,
        url=url,
        router=router,
        primary=table.primary if table else None,
        weights=table.weights if table else {},
        versions=version_apps(endpoint),
    )


def version_of(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == VERSION_HEADER), None)


def _state(status) -> str | None:
    if status is None:
        return None
    return str(getattr(status.status, "value", status.status))


# -- canary steps --------------------------------------------------------------------------------
class CanaryResult(StrictModel):
    percent: int
    started: float = Field(description="wall clock, when the weights were applied")
    finished: float
    candidate_requests: int
    candidate_errors: int
    error_rate: float
    p50_s: float | None
    p99_s: float | None
    probes_ok: int
    probes: int
    problems: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def canary_problems(step, window: TrafficWindow, probes: list[SmokeResult]) -> list[str]:
    """Why the candidate fails a canary step on what was measured (empty: it passed). `step` is a `CanaryStep`."""
    problems = []
    if window.error_rate > step.max_error_rate:
        problems.append(
            f"candidate error rate {window.error_rate:.2%} above max_error_rate {step.max_error_rate:.2%} "
            f"({window.errors} of {window.requests})"
        )
    p99 = window.percentile(99)
    if step.max_p99_latency_s is not None and p99 is not None and p99 > step.max_p99_latency_s:
        problems.append(f"candidate p99 latency {p99:.2f} s above max_p99_latency_s {step.max_p99_latency_s}")
    problems += [f"probe {p.prompt!r} failed: {p.reason}" for p in probes if p.measured and not p.ok]
    return problems


def canary_unmeasured(step, window: TrafficWindow, probes: list[SmokeResult]) -> list[str]:
    """What a canary step could not measure: too little candidate traffic to judge, probes that
    got no answer at all (empty: everything was measured)."""
    gaps = []
    if window.requests < step.min_requests:
        gaps.append(f"candidate served {window.requests} requests, fewer than min_requests {step.min_requests}")
    gaps += [f"probe {p.prompt!r} got {p.reason}" for p in probes if not p.measured]
    return gaps


def hold_and_check(config: RolloutConfig, step, candidate: VersionInfo, since: float, api_key: str | None = None) -> CanaryResult:
    """Hold `step` for its `hold_s`, sending its probes through the stable URL spread over the hold,
    then judge what the candidate served since `since` (`result.problems` lists what failed).

    Raises:
        CheckUnmeasured: nothing failed on what was measured, but the step could not be judged
            (too few candidate requests, probes without an answer).
    """
    probes: list[SmokeResult] = []
    gap = step.hold_s / (step.probe_requests + 1)
    for i in range(step.probe_requests):
        _sleep_until(since + (i + 1) * gap)
        prompt = config.smoke[i % len(config.smoke)]
        probes.append(ask(config.stable_url, config.model_id, prompt, api_key, config.timeouts.request_s))
    _sleep_until(since + step.hold_s)
    window = router_stats(config.endpoint, since).get(candidate.version, TrafficWindow())
    result = CanaryResult(
        percent=step.percent,
        started=since,
        finished=time.time(),
        candidate_requests=window.requests,
        candidate_errors=window.errors,
        error_rate=round(window.error_rate, 4),
        p50_s=window.percentile(50),
        p99_s=window.percentile(99),
        probes_ok=sum(p.ok for p in probes),
        probes=len(probes),
        problems=canary_problems(step, window, probes),
    )
    gaps = canary_unmeasured(step, window, probes)
    if result.passed and gaps:
        raise CheckUnmeasured(f"canary {step.percent}%: " + "; ".join(gaps))
    return result


def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)
