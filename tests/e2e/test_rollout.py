"""Endpoint rollout: config checks and traffic logic (fast), then real rollouts on Ray Serve LLM with
the CPU vLLM engine under a concurrent client load (slow).

The slow tests share one endpoint, whose fixture deploys the trained tiny model as the first
version. Then: the untrained twin with an unreachable gate (an injected fault) ends `inconclusive`;
the untrained twin again, which the evaluation gate rejects; a good candidate through the canary
steps. Four engines start in all.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from prefect_rayllm.rayllm_stages.config.base import ConfigError, validate_config
from prefect_rayllm.rayllm_stages.rollout.config import CanaryStep, RolloutConfig
from prefect_rayllm.rayllm_stages.rollout.endpoints import SmokeResult, canary_problems, canary_unmeasured
from prefect_rayllm.rayllm_stages.rollout.traffic import (
    RouteTable,
    TrafficStats,
    TrafficWindow,
    VersionRoute,
    WeightedPicker,
    merge_stats,
    shifted,
)

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Is red warm or cool?"


def rollout_dict(**extra) -> dict:
    return {
        "endpoint": "colours",
        "model_id": "colours",
        "candidate": {"source": "/models/tiny", "engine_kwargs": {"max_model_len": 256}},
        "smoke": [{"prompt": PROMPT, "expect": "warm"}],
        **extra,
    }


# -- fast ----------------------------------------------------------------------------------------
def test_config_refuses_what_cannot_roll_out():
    cases = [
        (
            rollout_dict(canary=[{"percent": 50}, {"percent": 10}, {"percent": 100}]),
            "canary percents must rise strictly and end at 100",
        ),
        (rollout_dict(canary=[{"percent": 10}, {"percent": 50}]), "end at 100"),
        (rollout_dict(candidate={"source": "m", "engine": "http", "base_url": "http://x/v1"}), "candidate.engine must be 'vllm'"),
        (rollout_dict(candidate={"source": "m", "id": "other"}), "candidate.id must be unset or equal model_id"),
        (rollout_dict(endpoint="Colours!"), "endpoint"),
        (rollout_dict(route_prefix="colours"), "route_prefix must start with '/'"),
        (rollout_dict(smoke=[]), "smoke"),
        (rollout_dict(api_key_env="A", api_key_secret="B"), "not both"),
        (rollout_dict(evaluation={"targets": []}), "evaluation.targets: leave it out"),
        (
            rollout_dict(evaluation={"name": "c", "dataset": {"path": "d.jsonl"}, "metrics": [{"type": "exact_match"}]}),
            "evaluation.output is required",
        ),
        (rollout_dict(canary=[{"percent": 100, "hold_s": 1, "max_eror_rate": 0.1}]), "canary.0.max_eror_rate: unknown key"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_config(RolloutConfig, data)


def test_version_id_names_the_candidate_settings_and_eval_targets_its_url():
    config = validate_config(
        RolloutConfig,
        rollout_dict(
            evaluation={
                "name": "colours",
                "dataset": {"path": "d.jsonl"},
                "output": "/tmp/evals/",
                "metrics": [{"type": "exact_match"}],
                "gate": {"min": {"exact_match": 0.8}, "fail_flow": True},
            },
            api_key_env="COLOURS_KEY",
        ),
    )
    same = validate_config(RolloutConfig, rollout_dict(canary=[{"percent": 100}], smoke=[{"prompt": "other"}]))
    other = validate_config(
        RolloutConfig, rollout_dict(candidate={"source": "/models/tiny-2", "engine_kwargs": {"max_model_len": 256}})
    )
    assert config.version_id() == same.version_id() != other.version_id()
    assert config.stable_url == "http://127.0.0.1:8000/colours/v1"

    evaluation = config.evaluation_config("http://127.0.0.1:8000/colours-v-1/v1", "v-1")
    (target,) = evaluation.targets
    assert target.model.base_url == "http://127.0.0.1:8000/colours-v-1/v1" and target.model.source == "colours"
    assert target.model.api_key_env == "COLOURS_KEY"  # the name of the variable, never the key
    assert evaluation.output == "/tmp/evals/v-1" and evaluation.gate.fail_flow is False


def test_weighted_picker_gives_exact_interleaved_shares():
    picker = WeightedPicker({"old": 90, "new": 10})
    picks = [picker.pick() for _ in range(1000)]
    assert picks.count("new") == 100
    # every run of 10 consecutive picks holds exactly one "new": no bursts
    assert all(picks[i : i + 10].count("new") == 1 for i in range(0, 1000, 10))
    assert {WeightedPicker({"a": 0, "b": 100}).pick() for _ in range(10)} == {"b"}
    with pytest.raises(ValueError):
        WeightedPicker({"a": 0})


def test_route_table_shifts_keep_the_primary_and_refuse_unknown_versions():
    old = VersionRoute(version="v-old", app="colours-v-old", deployment="LLMServer:colours", weight=100)
    new = VersionRoute(version="v-new", app="colours-v-new", deployment="LLMServer:colours", weight=0)
    table = RouteTable(model_id="colours", primary="v-old", routes=[old])

    canary = shifted(table, {"v-old": 90, "v-new": 10}, [new])
    assert canary.weights == {"v-old": 90, "v-new": 10} and canary.primary == "v-old"
    full = shifted(canary, {"v-old": 0, "v-new": 100})
    assert full.weights == {"v-old": 0, "v-new": 100} and full.primary == "v-old"  # old keeps its route until promotion
    promoted = shifted(full, {"v-new": 100}, primary="v-new")
    assert promoted.weights == {"v-new": 100} and promoted.primary == "v-new"
    assert shifted(canary, {"v-old": 100}).weights == {"v-old": 100}  # rollback drops the candidate

    with pytest.raises(ValueError, match="no route for version"):
        shifted(table, {"v-old": 50, "v-ghost": 50})
    with pytest.raises(ValueError, match="add up to 100"):
        shifted(canary, {"v-old": 50, "v-new": 10})
    with pytest.raises(ValueError, match="primary 'v-old' has no route"):
        shifted(canary, {"v-new": 100})


def test_stats_windows_merge_and_judge_a_canary_step():
    stats = TrafficStats()
    t0 = 1000.0
    for i in range(10):
        stats.record("v-new", 0.1 * (i + 1), ok=i != 9, at=t0 + i)
    stats.record("v-old", 0.2, ok=True, at=t0 + 5)
    recent = stats.since(t0 + 5)
    assert recent["v-new"]["requests"] == 5 and recent["v-new"]["errors"] == 1 and recent["v-old"]["requests"] == 1
    merged = merge_stats([recent, stats.since(t0 + 8)])
    assert merged["v-new"].requests == 7 and merged["v-new"].errors == 2

    window = merge_stats([stats.since(t0)])["v-new"]
    assert window.percentile(50) == 0.5 and window.percentile(99) == 1.0
    step = CanaryStep(percent=10, max_error_rate=0.05, max_p99_latency_s=0.5, min_requests=20)
    probes = [
        SmokeResult(prompt=PROMPT, ok=False, latency_s=0.1, reason="HTTP 500: boom"),
        SmokeResult(prompt=PROMPT, ok=False, latency_s=60, reason="no answer: TimeoutError: timed out", measured=False),
    ]
    problems = canary_problems(step, window, probes)
    assert len(problems) == 3
    assert "error rate 10.00% above" in problems[0] and "p99 latency 1.00 s above" in problems[1]
    assert "HTTP 500: boom" in problems[2]
    # What could not be measured is no verdict on the candidate: too little traffic, no answer.
    gaps = canary_unmeasured(step, window, probes)
    assert len(gaps) == 2 and "fewer than min_requests 20" in gaps[0] and "TimeoutError" in gaps[1]
    assert canary_problems(CanaryStep(percent=10), TrafficWindow(), []) == []
    assert canary_unmeasured(CanaryStep(percent=10), TrafficWindow(), []) == []


def test_a_check_without_an_answer_is_unmeasured_not_failed():
    """Smoke prompts against a port where nothing listens: no verdict, so it is retried, never
    reported as the candidate failing."""
    from prefect_rayllm.rayllm_stages.rollout.config import SmokePrompt
    from prefect_rayllm.rayllm_stages.rollout.endpoints import CandidateRejected, CheckUnmeasured, smoke_test

    with pytest.raises(CheckUnmeasured, match="2 of 2 smoke prompts got no answer") as raised:
        smoke_test(f"http://127.0.0.1:{_free_port()}/v1", "colours", [SmokePrompt(prompt=PROMPT)] * 2, timeout_s=5)
    assert not isinstance(raised.value, CandidateRejected)


def test_reasons_are_plain_text_and_only_unmeasured_checks_are_retried():
    from prefect.states import Failed

    from prefect_rayllm.rayllm_stages.rollout.endpoints import CheckUnmeasured, SmokeTestFailed
    from prefect_rayllm.tasks.endpoints import GateRejected, _retry_unless_verdict, check_retries, plain_reason

    coloured = RuntimeError(
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "\x1b[1;31mSmokeTestFailed\x1b[0m: reply does not contain 'warm'\n"
    )
    assert plain_reason(coloured) == "RuntimeError: SmokeTestFailed: reply does not contain 'warm'"
    assert plain_reason(SmokeTestFailed("1 of 1 smoke prompts failed:\n  'x': empty reply")) == (
        "SmokeTestFailed: 1 of 1 smoke prompts failed: 'x': empty reply"
    )
    assert len(plain_reason(RuntimeError("x" * 2000))) == 500

    config = validate_config(RolloutConfig, rollout_dict(timeouts={"check_attempts": 3, "check_backoff_s": 5}))
    options = check_retries(config)
    assert options["retries"] == 2 and options["retry_delay_seconds"] == [5, 10]
    verdicts = [SmokeTestFailed("no"), GateRejected("no"), ConfigError("bad")]
    assert not any(_retry_unless_verdict(None, None, Failed(data=exc)) for exc in verdicts)
    assert _retry_unless_verdict(None, None, Failed(data=CheckUnmeasured("no answer")))
    assert _retry_unless_verdict(None, None, Failed(data=ConnectionRefusedError("refused")))


def test_smoke_replies_are_judged_on_content_latency_and_schema():
    from prefect_rayllm.rayllm_stages.rollout.config import SmokePrompt
    from prefect_rayllm.rayllm_stages.rollout.endpoints import _judge

    plain = SmokePrompt(prompt=PROMPT, expect="warm", max_latency_s=1.0)
    assert _judge(plain, "warm", 0.2) is None
    assert _judge(plain, "  ", 0.2) == "empty reply"
    assert "does not contain 'warm'" in _judge(plain, "cool", 0.2)
    assert "above max_latency_s 1.0" in _judge(plain, "warm", 1.5)
    schema = SmokePrompt(
        prompt="Rate it", json_schema={"type": "object", "properties": {"score": {"enum": [1, 2, 3]}}, "required": ["score"]}
    )
    assert _judge(schema, '{"score": 2}', 0.1) is None
    assert "not JSON matching the schema" in _judge(schema, '{"score": 7}', 0.1)
    assert "not JSON matching the schema" in _judge(schema, "score: 2", 0.1)


def test_endpoint_needs_serve_with_its_http_proxy(ray_session):
    """A batch job's Serve has no HTTP proxy: a rollout refuses it instead of serving nowhere."""
    from ray import serve

    from prefect_rayllm.rayllm_stages.rollout.config import HttpOptions
    from prefect_rayllm.rayllm_stages.rollout.endpoints import ServeProxyMissing, ensure_serve_http

    serve.shutdown()
    serve.start(proxy_location="Disabled")
    try:
        with pytest.raises(ServeProxyMissing, match="without an HTTP proxy"):
            ensure_serve_http(HttpOptions(port=_free_port()))
        serve.shutdown()
        port = _free_port()
        ensure_serve_http(HttpOptions(port=port))
        assert serve.status().proxies
        ensure_serve_http(HttpOptions(port=port))  # idempotent
        with pytest.raises(ServeProxyMissing, match=f"listens on port {port}"):
            ensure_serve_http(HttpOptions(port=port + 1))
    finally:
        serve.shutdown()


# -- slow: real Serve, real CPU vLLM, real Prefect -------------------------------------------------
ENDPOINT_KEY = "sk-rollout-5c1e0b-not-a-real-key"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _window(samples, step):
    """Client requests that ran entirely inside one rollout step (a step record or canary result)."""
    return [s for s in samples if s.start >= step.started and s.end <= step.finished]


def _step(report, name):
    return next(s for s in report.steps if s.step == name)


@pytest.fixture(scope="module")
def endpoint(ray_session, prefect_server, tiny_models, monkeypatch_module):
    """The endpoint "colours" with the trained tiny model as its first version (one engine)."""
    from ray import serve

    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout import endpoints

    monkeypatch_module.setenv("ROLLOUT_KEY", ENDPOINT_KEY)
    serve.shutdown()  # earlier tests' Serve runs without an HTTP proxy
    port = _free_port()

    def config(candidate: Path, **extra) -> RolloutConfig:
        return RolloutConfig.model_validate(
            {
                "endpoint": "colours",
                "model_id": "colours",
                "candidate": {"source": str(candidate), "engine_kwargs": {"max_model_len": 256}},
                "http": {"port": port},
                "api_key_env": "ROLLOUT_KEY",
                "smoke": [{"prompt": PROMPT, "expect": "warm", "max_latency_s": 30}],
                "timeouts": {"deploy_s": 600, "drain_s": 2},
                **extra,
            }
        )

    first = config(tiny_models["good"])
    report = rollout_endpoint(config=first)
    assert report.outcome == "promoted" and report.previous is None and report.serving == first.version_id()
    assert [s.step for s in report.steps] == ["deploy", "health", "smoke", "route 100% (first version)", "promote"]
    yield config, first.version_id()
    endpoints.teardown("colours")
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _load(config: RolloutConfig):
    from prefect_rayllm.rayllm_stages.testing.client_load import ClientLoad

    return ClientLoad(config.stable_url, config.model_id, PROMPT, concurrency=2, max_tokens=4, api_key=ENDPOINT_KEY)


def _engine_deployment(app: str) -> tuple[dict, set[str]]:
    """The version's engine deployment: its autoscaling config and its replicas' ids."""
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    [engine] = [d for name, d in deployments.items() if name.startswith("LLMServer:")]
    return engine["deployment_config"]["autoscaling_config"], {r["replica_id"] for r in engine["replicas"]}


@pytest.mark.slow
def test_scale_changes_the_bounds_of_the_running_version_in_place(endpoint, tiny_models):
    from prefect_rayllm.rayllm_stages.rollout import endpoints
    from prefect_rayllm.tasks.endpoints import scale_version

    make_config, current = endpoint
    config = make_config(tiny_models["good"])
    assert config.version_id() == current
    app = f"colours-{current}"
    _, replicas = _engine_deployment(app)

    scale_version(config, 1, 2)
    widened, widened_replicas = _engine_deployment(app)
    scale_version(config, 1, 2)  # a retried task changes nothing
    scale_version(config, 1, 1)
    narrowed, narrowed_replicas = _engine_deployment(app)

    assert (widened["min_replicas"], widened["max_replicas"]) == (1, 2)
    assert (narrowed["min_replicas"], narrowed["max_replicas"]) == (1, 1)
    assert replicas == widened_replicas == narrowed_replicas, "scaling restarted the engine"
    with pytest.raises(ValueError, match="not deployed"):
        endpoints.scale_version(make_config(tiny_models["bad"]), 1, 1, gpu=False)
    with pytest.raises(ValueError, match="min"):
        endpoints.scale_version(config, 2, 1, gpu=False)


def _gate_evaluation(tmp_path: Path) -> dict:
    """An evaluation gate on the toy task: exact match at least 0.8."""
    from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

    dataset = tmp_path / "eval.jsonl"
    dataset.write_text(
        "".join(json.dumps({"qid": f"q{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(TOY_TASK))
    )
    return {
        "name": "colours-rollout",
        "output": str(tmp_path / "evals"),
        "dataset": {
            "path": str(dataset),
            "id_field": "qid",
            "input_field": "question",
            "reference_field": "answer",
            "tags_field": None,
        },
        "prompt": {"user": "{{ question }}"},
        "sampling": {"max_tokens": 8},
        "metrics": [{"type": "exact_match"}],
        "gate": {"min": {"exact_match": 0.8}},
    }


@pytest.mark.slow
@pytest.mark.nightly  # about 2 minutes (a candidate engine); keeps CI under 45 minutes. The gate's pass and fail run in CI.
def test_an_unmeasurable_gate_stops_the_rollout_as_inconclusive(endpoint, tiny_models, tmp_path, monkeypatch):
    """Injected fault: the gate's evaluation endpoint is unreachable (a port where nothing
    listens). The gate is tried `check_attempts` times with doubling backoff, then the rollout stops
    as `inconclusive`: candidate removed, traffic as before, the reason says what could not be
    measured, and nothing says the candidate failed the bar."""
    from prefect import flow
    from prefect_api import artifacts_with_key, wait_for_event

    import prefect_rayllm.flows.rollout as rollout_flow
    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout import endpoints
    from prefect_rayllm.tasks.endpoints import RolloutInconclusive, RolloutRolledBack
    from prefect_rayllm.tasks.reporting import artifact_key

    make_config, current = endpoint
    unreachable = f"http://127.0.0.1:{_free_port()}/v1"
    tries: list[float] = []

    @flow(name="evaluate-injected-fault-unreachable-endpoint")
    def injected_fault_unreachable_gate(config):
        tries.append(time.monotonic())
        endpoints.http_json("GET", f"{unreachable}/models", timeout_s=5)  # refused: nothing listens there

    monkeypatch.setattr(rollout_flow, "evaluate", injected_fault_unreachable_gate)
    config = make_config(
        tiny_models["bad"],
        smoke=[{"prompt": PROMPT}],
        evaluation=_gate_evaluation(tmp_path),
        timeouts={"deploy_s": 600, "drain_s": 2, "check_attempts": 3, "check_backoff_s": 2},
    )
    began = datetime.now(UTC)
    with _load(config) as load:
        time.sleep(2)
        with pytest.raises(RolloutInconclusive) as raised:
            rollout_endpoint(config=config)
        time.sleep(2)
    report = raised.value.report

    assert not isinstance(raised.value, RolloutRolledBack)
    assert report.outcome == "inconclusive" and report.serving == current
    assert report.reason.startswith("evaluation gate could not be measured: CheckUnmeasured: the evaluation failed 3 times")
    assert "Connection refused" in report.reason and "rejected" not in report.reason
    assert [(s.step, s.passed) for s in report.steps] == [
        ("deploy", True),
        ("health", True),
        ("smoke", True),
        ("evaluation gate", False),
    ]
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert len(tries) == 3 and gaps[0] >= 1.9 and gaps[1] >= 3.9, gaps  # backoff 2 s, then 4 s

    status = endpoints.endpoint_status("colours")
    assert status.primary == current and status.weights == {current: 100}
    assert list(status.versions) == [f"colours-{current}"]  # the candidate is gone
    assert [s.error for s in load.samples if not s.ok] == [] and {s.version for s in load.samples} == {current}

    tables = [str(a.data) for a in artifacts_with_key(artifact_key("rollout", "colours"))]
    stopped = [data for data in tables if "the evaluation failed 3 times" in data]
    assert stopped and "\x1b" not in stopped[-1] and "Traceback" not in stopped[-1]  # plain text
    event = wait_for_event("rayllm.rollout.inconclusive", "rayllm.endpoint.colours", since=began)
    assert event.payload["serving"] == current and event.payload["outcome"] == "inconclusive"


@pytest.mark.slow
def test_gate_rejects_a_bad_candidate_and_the_old_version_keeps_serving(endpoint, tiny_models, tmp_path):
    from prefect_api import artifacts_with_key, wait_for_event

    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout import endpoints
    from prefect_rayllm.tasks.endpoints import RolloutRolledBack
    from prefect_rayllm.tasks.reporting import artifact_key

    make_config, current = endpoint
    config = make_config(tiny_models["bad"], smoke=[{"prompt": PROMPT}], evaluation=_gate_evaluation(tmp_path))
    start, began = time.monotonic(), datetime.now(UTC)
    with _load(config) as load:
        time.sleep(2)
        with pytest.raises(RolloutRolledBack) as raised:
            rollout_endpoint(config=config)
        time.sleep(2)
    elapsed = time.monotonic() - start
    report = raised.value.report

    assert report.outcome == "rolled_back" and report.serving == current and "evaluation gate rejected" in report.reason
    assert [(s.step, s.passed) for s in report.steps] == [
        ("deploy", True),
        ("health", True),
        ("smoke", True),
        ("evaluation gate", False),
    ]
    failures = [s.error for s in load.samples if not s.ok]
    assert failures == [] and len(load.samples) > 20
    assert {s.version for s in load.samples} == {current} and {s.text for s in load.samples} == {"warm"}
    status = endpoints.endpoint_status("colours")
    assert status.primary == current and status.weights == {current: 100}
    assert list(status.versions) == [f"colours-{current}"]  # the candidate is gone

    artifacts = [str(a.data) for a in artifacts_with_key(artifact_key("rollout", "colours"))]
    assert any("evaluation gate" in data and "FAILED" in data for data in artifacts)
    event = wait_for_event("rayllm.rollout.rolled_back", "rayllm.endpoint.colours", since=began)
    assert event.payload["serving"] == current
    for text in (*artifacts, str(event.payload), report.model_dump_json(), config.model_dump_json()):
        assert ENDPOINT_KEY not in text
    from prefect_rayllm.rayllm_stages.testing.client_load import summarize

    print(f"\nrollback path: {summarize(load.samples)} over {elapsed:.0f} s")


@pytest.mark.slow
def test_good_candidate_goes_through_canary_steps_and_is_promoted(endpoint, tiny_models, tmp_path):
    from prefect_api import wait_for_event

    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout import endpoints
    from prefect_rayllm.rayllm_stages.testing.client_load import summarize

    make_config, current = endpoint
    candidate_folder = shutil.copytree(tiny_models["good"], tmp_path / "tiny-good-v2")  # another version of the same weights
    config = make_config(
        candidate_folder,
        canary=[
            {"percent": 10, "hold_s": 15, "probe_requests": 2, "min_requests": 1, "max_p99_latency_s": 30},
            {"percent": 50, "hold_s": 15, "probe_requests": 2, "min_requests": 1, "max_p99_latency_s": 30},
            {"percent": 100, "hold_s": 10, "probe_requests": 2, "min_requests": 1, "max_p99_latency_s": 30},
        ],
    )
    new = config.version_id()
    assert new != current
    start, began = time.monotonic(), datetime.now(UTC)
    with _load(config) as load:
        time.sleep(2)
        report = rollout_endpoint(config=config)
        time.sleep(2)
    elapsed = time.monotonic() - start

    assert report.outcome == "promoted" and report.previous == current and report.serving == new
    failures = [s.error for s in load.samples if not s.ok]
    assert failures == [] and {s.text for s in load.samples} == {"warm"}
    shares = {}
    for step in report.canary:  # from the moment the router applied the step's weights
        window = _window(load.samples, step)
        assert window, f"no client request inside canary {step.percent}%"
        shares[step.percent] = sum(s.version == new for s in window) / len(window)
    assert 0 < shares[10] < shares[50] < shares[100] == 1.0
    assert 0.02 <= shares[10] <= 0.3 and 0.3 <= shares[50] <= 0.7
    assert all(c.candidate_requests >= 1 and c.candidate_errors == 0 for c in report.canary)

    status = endpoints.endpoint_status("colours")
    assert status.primary == new and status.weights == {new: 100} and list(status.versions) == [f"colours-{new}"]
    after = [s for s in load.samples if s.start > _step(report, "promote").finished]
    assert after and {s.version for s in after} == {new}
    event = wait_for_event("rayllm.rollout.promoted", "rayllm.endpoint.colours", since=began)
    assert event.payload["serving"] == new and event.payload["previous"] == current
    print(f"\npromote path: {summarize(load.samples)} over {elapsed:.0f} s; candidate share per step {shares}")
    for c in report.canary:
        print(
            f"  canary {c.percent}%: candidate {c.candidate_requests} requests, {c.candidate_errors} errors, p50 {c.p50_s} s, p99 {c.p99_s} s"
        )
