"""Deployments: prefect.yaml checked against the flows, and end to end on a real Prefect server.

The end-to-end tests start `prefect server start` on a free loopback port (SQLite in a temporary
PREFECT_HOME), a process work pool, `rayllm deploy`, a `prefect worker start` subprocess, and
`rayllm serve`; runs are started the way the UI does (`prefect deployment run`) or by a schedule.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import jinja2
import pytest
import yaml
from conftest import OPENAI_SERVER_KEY, REPO, openai_line

from prefect_rayllm.deployments.project import PREFECT_FILE, deployment_specs, fill_examples, load_project
from prefect_rayllm.rayllm_stages.config.base import load_config

BIN = Path(sys.executable).parent
EXAMPLES = {  # deployment -> the example config its parameters come from
    "batch": "batch-openai.yaml",
    "chain": "chain-cpu.yaml",
    "nightly": "curate-s3.yaml",
    "weekly-candidate": "eval-candidate.yaml",
    "colours": "rollout-cpu.yaml",
}
SAMPLE_EVENT = {"event": {"payload": {"targets": {"candidate": "./models/tiny-next"}}, "resource": {}}}


def _config_model(flow):
    import inspect
    import typing

    return typing.get_type_hints(flow.fn)["config"] if "config" in inspect.signature(flow.fn).parameters else None


def _as_prefect_deploy_sends(parameters: dict) -> dict:
    """The parameters after `prefect deploy`'s own templating (env vars, then step outputs)."""
    from prefect.utilities.templating import apply_values

    once = apply_values(parameters, dict(os.environ), remove_notset=False)
    return apply_values(once, {}, warn_on_notset=False, skip_prefixes=["ctx."])


def _unparenthesise(value):
    """`{{ (question) }}` (prefect.yaml's spelling) -> `{{ question }}` (the example configs')."""
    if isinstance(value, dict):
        return {k: _unparenthesise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unparenthesise(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"\{\{ \((\w+)\) \}\}", r"{{ \1 }}", value)
    return value


def _render_like_an_automation(value, context):
    """Trigger parameters as the automation renders them: every string with Jinja, with the event."""
    if isinstance(value, dict):
        return {k: _render_like_an_automation(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_like_an_automation(v, context) for v in value]
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(value).render(context)
    return value


# -- prefect.yaml against the flows (fast) ------------------------------------------------------
def test_every_entrypoint_imports_and_its_parameters_pass_the_flow_schema():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    specs = deployment_specs()
    assert {s.name for s in specs} == set(EXAMPLES)
    for spec in specs:
        flow = spec.load_flow()
        schema = parameter_schema(flow).model_dump_for_openapi()
        sent = _as_prefect_deploy_sends(spec.parameters)
        assert sent == spec.parameters, f"{spec.name}: prefect deploy would change its parameters"
        validate(sent, schema, raise_on_error=True)
        _config_model(flow).model_validate(sent["config"])
        for trigger in spec.triggers:
            rendered = _render_like_an_automation(trigger["parameters"], SAMPLE_EVENT)
            validate(rendered, schema, raise_on_error=True)
            config = _config_model(flow).model_validate(rendered["config"])
            assert config.candidate.source == "./models/tiny-next"
            assert config.evaluation["prompt"]["user"] == "{{ question }}"


def test_parameters_are_the_example_configs():
    raw = {entry["name"]: entry["parameters"] for entry in load_project()["deployments"]}
    for spec in deployment_specs():
        model = _config_model(spec.load_flow())
        example = load_config(model, REPO / "examples" / EXAMPLES[spec.name])
        shipped = fill_examples(raw[spec.name]["config"], "./examples")  # examples/data is the package's folder
        assert model.model_validate(_unparenthesise(shipped)) == example, spec.name


def test_schedules_pool_concurrency_tags_and_trigger():
    specs = {s.name: s for s in deployment_specs()}
    assert specs["batch"].schedules == [] and specs["colours"].schedules == []
    assert [s["cron"] for s in specs["nightly"].schedules] == ["0 2 * * *"]
    assert [s["cron"] for s in specs["weekly-candidate"].schedules] == ["0 6 * * 1"]
    assert {s.work_pool["name"] for s in specs.values()} == {"rayllm"}
    assert specs["colours"].work_pool["work_queue_name"] == "rollout"
    assert specs["colours"].concurrency_limit == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert all("rayllm" in s.tags for s in specs.values())
    assert all(s.env["RAYLLM_RAY_LOG_LEVEL"] == "WARNING" for s in specs.values())
    (trigger,) = specs["colours"].triggers
    assert trigger["expect"] == ["rayllm.evaluation.completed"]
    assert trigger["match"] == {"prefect.resource.id": "rayllm.evaluation.colours-candidate", "rayllm.gate": "passed"}
    evaluation = specs["weekly-candidate"].parameters["config"]
    assert trigger["match"]["prefect.resource.id"] == f"rayllm.evaluation.{evaluation['name']}"
    assert [t["name"] for t in evaluation["targets"]] == ["candidate"]
    assert load_project()["pull"][0]["prefect_rayllm.deployments.steps.pull_code"]["checkout"] == "{{ $RAYLLM_CHECKOUT }}"


def test_serve_builds_the_same_deployments():
    from prefect.utilities.importtools import import_object

    from prefect_rayllm.deployments.serve import runner_deployments

    served = {d.name: d for d in runner_deployments()}
    assert set(served) == set(EXAMPLES)
    assert [s.schedule.cron for s in served["nightly"].schedules] == ["0 2 * * *"]
    assert served["colours"].concurrency_limit == 1
    assert [t.expect for t in served["colours"].triggers] == [{"rayllm.evaluation.completed"}]
    assert served["batch"].parameters == deployment_specs(names=["batch"])[0].parameters
    assert served["batch"].entrypoint == "prefect_rayllm.deployments.served.batch"
    flows = {spec.name: import_object(served[spec.name].entrypoint) for spec in deployment_specs()}
    assert (flows["batch"].retries, flows["batch"].retry_delay_seconds) == (1, 60)
    assert (flows["nightly"].retries, flows["nightly"].retry_delay_seconds) == (1, 600)
    assert flows["colours"].retries == 0  # a rollback is a decision, not a fault


def test_pull_code_uses_the_checkout_else_clones(tmp_path, monkeypatch):
    from prefect_rayllm.deployments.steps import pull_code

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "marker.txt").write_text("v1")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "one"]):
        subprocess.run(git + command, cwd=repo, check=True)
    monkeypatch.chdir(tmp_path)
    assert pull_code(checkout=str(repo)) == {"directory": str(repo)}
    assert Path.cwd() == repo
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cloned = pull_code(checkout="", repository=str(repo), branch="main")
    assert (Path.cwd() / "marker.txt").read_text() == "v1" and Path.cwd() != repo
    assert Path(cloned["directory"]).name
    here = str(Path.cwd())
    assert pull_code(checkout="", repository="") == {"directory": here} and str(Path.cwd()) == here  # the installed package


def test_deploy_without_a_prefect_api_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    outcome = subprocess.run([str(BIN / "rayllm"), "deploy"], env=env, capture_output=True, text=True, timeout=300)
    assert outcome.returncode == 2, outcome.stderr
    assert "no Prefect API configured" in outcome.stderr


def test_endpoint_lock_admits_one_rollout_per_endpoint(prefect_server):
    from prefect_rayllm.tasks.locks import endpoint_lock

    endpoint = f"lock-{uuid.uuid4().hex[:8]}"
    held, release = threading.Event(), threading.Event()

    def holder():
        with endpoint_lock(endpoint):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(TimeoutError), endpoint_lock(endpoint, timeout_seconds=2):
            pass
        with endpoint_lock(f"{endpoint}-other", timeout_seconds=30):
            pass  # another endpoint is not held up
    finally:
        release.set()
        thread.join(60)
    with endpoint_lock(endpoint, timeout_seconds=30):
        pass  # free again once the first rollout is done


def test_a_failed_evaluation_emits_its_event(tmp_path, prefect_server, ray_session):
    from prefect_api import wait_for_event

    from prefect_rayllm.flows.evaluation import evaluate
    from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig

    name = f"missing-{uuid.uuid4().hex[:8]}"
    config = EvaluationConfig(
        name=name,
        dataset={"path": str(tmp_path / "nowhere.jsonl")},
        output=str(tmp_path / "out"),
        targets=[{"name": "t", "model": {"source": "m", "engine": "http", "base_url": "http://127.0.0.1:9/v1"}}],
        metrics=[{"type": "exact_match"}],
    )
    with pytest.raises(Exception):
        evaluate(config=config)
    event = wait_for_event("rayllm.evaluation.failed", f"rayllm.evaluation.{name}")
    assert "nowhere.jsonl" in event.payload["reason"]


def test_job_failed_hook_emits_the_failed_event(prefect_server):
    from types import SimpleNamespace

    from prefect_api import wait_for_event

    from prefect_rayllm.tasks.reporting import job_failed_hook

    output = f"s3://bucket/curated/{uuid.uuid4().hex[:8]}/"
    job_failed_hook("curation")(
        None, SimpleNamespace(parameters={"config": {"output": output}}), SimpleNamespace(message="S3 down")
    )
    event = wait_for_event("rayllm.curation.failed", f"rayllm.curation.{output.rstrip('/')}")
    assert event.payload == {"reason": "S3 down"}


# -- end to end on a real Prefect server (slow) -------------------------------------------------
def _spawn(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen | None) -> None:
    from prefect_rayllm.deployments.server import stop_process_group

    if process is not None and process.poll() is None:
        stop_process_group(process, grace_s=30)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


@contextmanager
def _api(url: str):
    """The Prefect client (and blocks, events) of the test server, inside this pytest process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """`prefect server start` on loopback with its own PREFECT_HOME, the work pool, `rayllm deploy`."""
    from prefect_rayllm.deployments.server import LocalPrefectServer

    root = tmp_path_factory.mktemp("prefect-stack")
    server = LocalPrefectServer(
        home=root / "home",
        ui=False,
        log_path=root / "server.log",
        env={
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
            "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
            "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "2",
        },
    )
    started = time.time()
    url = server.start(timeout_s=240)
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    # `{{ $RAYLLM_CHECKOUT }}` is resolved when deploying if set there (baked in); here only the
    # worker and `rayllm serve` have it, so each run resolves it where it runs.
    env.pop("RAYLLM_CHECKOUT", None)
    try:
        timings = {"server start": time.time() - started}
        started = time.time()
        created = subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", "rayllm", "--type", "process"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = subprocess.run([str(BIN / "rayllm"), "deploy"], env=env, capture_output=True, text=True, timeout=600)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        timings["work pool + rayllm deploy"] = time.time() - started
        yield {"url": url, "env": env, "root": root, "timings": timings}
    finally:
        server.stop()
        print(f"\nprefect server log: {root / 'server.log'}")


def _batch_params(tmp_path: Path, base_url: str, output: str) -> dict:
    from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

    lines = [openai_line(f"q{i}", question) for i, (question, _) in enumerate(TOY_TASK)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "config": {
            "input": str(tmp_path / "in.jsonl"),
            "output": str(tmp_path / output),
            "model": {
                "source": "tiny-good",
                "engine": "http",
                "base_url": base_url,
                "api_key_secret": "tiny-server-key",
                "concurrency": 1,
                "batch_size": 4,
            },
            "sampling": {"max_tokens": 8},
            "max_error_rate": 0.0,
        }
    }


def _wait_for_run(client, run_id, timeout_s: float, logs: list[Path]):
    deadline = time.time() + timeout_s
    while True:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            assert run.state.is_completed(), f"run ended {run.state.type}: {run.state.message}\n" + "\n".join(
                _tail(p) for p in logs
            )
            return run
        assert time.time() < deadline, f"run still {run.state.type if run.state else None} after {timeout_s} s\n" + "\n".join(
            _tail(p) for p in logs
        )
        time.sleep(2)


@pytest.mark.slow
def test_ui_style_run_on_a_worker_with_artifacts_events_schedules_and_automation(prefect_stack, openai_server, tmp_path):
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
    from prefect_rayllm.tasks.reporting import artifact_key

    url, env, root = prefect_stack["url"], prefect_stack["env"], prefect_stack["root"]
    timings = dict(prefect_stack["timings"])
    with _api(url) as client:
        # Registered from prefect.yaml: schedules with their cron strings, typed parameter forms,
        # the rollout queue and its concurrency, the automation on a passed evaluation.
        deployments = {f"{d.name}": d for d in client.read_deployments()}
        assert set(deployments) == set(EXAMPLES)
        crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
        assert crons == {"batch": [], "chain": [], "nightly": ["0 2 * * *"], "weekly-candidate": ["0 6 * * 1"], "colours": []}
        for name in ("nightly", "weekly-candidate"):  # their next runs must not reach the test's worker
            client.pause_deployment(deployments[name].id)
        schema = deployments["batch"].parameter_openapi_schema
        batch_form = schema["definitions"]["BatchJobConfig"]["properties"]
        assert batch_form["max_error_rate"]["type"] == "number" and batch_form["max_error_rate"]["maximum"] == 1.0
        max_tokens = schema["definitions"]["SamplingParams"]["properties"]["max_tokens"]
        assert max_tokens["type"] == "integer" and max_tokens["minimum"] == 1
        assert deployments["batch"].enforce_parameter_schema
        assert deployments["colours"].work_queue_name == "rollout"
        assert deployments["colours"].global_concurrency_limit.limit == 1
        assert deployments["colours"].concurrency_options.collision_strategy.value == "ENQUEUE"
        assert deployments["nightly"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert deployments["batch"].job_variables["env"]["RAYLLM_RAY_LOG_LEVEL"] == "WARNING"
        assert (
            deployments["batch"].pull_steps[0]["prefect_rayllm.deployments.steps.pull_code"]["checkout"]
            == "{{ $RAYLLM_CHECKOUT }}"
        )
        (automation,) = [a for a in client.read_automations() if a.name == "rollout-colours-when-candidate-passes"]
        assert automation.trigger.expect == {"rayllm.evaluation.completed"}
        assert automation.actions[0].deployment_id == deployments["colours"].id
        Secret(value=OPENAI_SERVER_KEY).save("tiny-server-key", overwrite=True)

    # A bad value is refused before any run exists, with the field named.
    params = _batch_params(tmp_path, openai_server, "out")
    bad = json.loads(json.dumps(params))
    bad["config"]["sampling"]["max_tokens"] = 0
    refused = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "batch-inference/batch", "--params", json.dumps(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0
    said = " ".join((refused.stdout + refused.stderr).split())  # the CLI wraps lines
    assert "Validation failed for field 'config.sampling.max_tokens'. Failure reason: 0 is less than the minimum of 1" in said

    worker_log = root / "worker.log"
    worker = _spawn(
        [str(BIN / "prefect"), "worker", "start", "--pool", "rayllm", "--work-queue", "default", "--name", "e2e-worker"],
        {**env, "RAYLLM_CHECKOUT": str(REPO)},
        worker_log,
        cwd=tmp_path,
    )
    try:
        started = time.time()
        run_cmd = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "batch-inference/batch", "--params", json.dumps(params)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run_cmd.returncode == 0, run_cmd.stdout + run_cmd.stderr
        run_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", run_cmd.stdout).group(1))
        with _api(url) as client:
            run = _wait_for_run(client, run_id, 900, [worker_log])
            timings["deployment run -> Completed"] = time.time() - started
            assert run.deployment_id == deployments["batch"].id

            config = BatchJobConfig.model_validate(params["config"])
            results = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
            assert len(results) == len(open(config.input).read().splitlines())
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            keys = {a.key for a in artifacts}
            assert {artifact_key("batch-summary", config.output), artifact_key("batch-report", config.output)} <= keys
            deadline = time.time() + 60
            while True:
                events = client.read_events(
                    filter=EventFilter(
                        event=EventNameFilter(prefix=["rayllm."]),
                        related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]),
                    ),
                    limit=50,
                ).events
                if events or time.time() > deadline:
                    break
                time.sleep(2)
            assert [e.event for e in events] == ["rayllm.batch.completed"]
            assert events[0].resource.id == f"rayllm.batch.{config.output.rstrip('/')}"
            assert events[0].payload["counts"]["completed"] == len(results)
            messages = [
                log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            ]
            assert any("pull_code" in m for m in messages), messages[:20]
            assert OPENAI_SERVER_KEY not in json.dumps(run.parameters) + "\n".join(messages)

            # The automation: a passed evaluation of the candidate starts the rollout with that
            # model. The rollout queue has no worker here, so the run waits there; it is checked
            # and deleted, never executed.
            event = {
                "id": str(uuid.uuid4()),
                "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": "rayllm.evaluation.completed",
                "resource": {
                    "prefect.resource.id": "rayllm.evaluation.colours-candidate",
                    "prefect.resource.name": "colours-candidate",
                    "rayllm.gate": "passed",
                },
                "payload": {"passed": True, "targets": {"candidate": "./models/tiny-next"}},
            }
            client._client.post("/events", json=[event]).raise_for_status()
            deadline = time.time() + 120
            while True:
                triggered = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["colours"])),
                    flow_run_filter=FlowRunFilter(),
                )
                if triggered or time.time() > deadline:
                    break
                time.sleep(2)
            assert len(triggered) == 1, "the automation did not start a rollout"
            rollout = triggered[0].parameters["config"]
            assert rollout["candidate"]["source"] == "./models/tiny-next"
            assert rollout["evaluation"]["prompt"]["user"] == "{{ question }}"
            client.delete_flow_run(triggered[0].id)
    finally:
        _stop(worker)
        print(f"\ntimings (s): { {k: round(v, 1) for k, v in timings.items()} }\nworker log: {worker_log}")


@pytest.mark.slow
def test_short_interval_schedule_fires_by_itself_under_rayllm_serve(prefect_stack, openai_server, tmp_path):
    url, env, root = prefect_stack["url"], prefect_stack["env"], prefect_stack["root"]
    # prefect.yaml's batch deployment, renamed, every 15 s, on the test's input and the test server's key.
    project = load_project(PREFECT_FILE)
    (batch,) = [d for d in project["deployments"] if d["name"] == "batch"]
    batch.update(
        name="batch-every-15s",
        schedules=[{"interval": 15, "slug": "every-15s"}],
        parameters=_batch_params(tmp_path, openai_server, "scheduled"),
    )
    project["deployments"] = [batch]
    variant = tmp_path / "prefect.yaml"
    variant.write_text(yaml.safe_dump(project, sort_keys=False))

    serve_log = root / "serve.log"
    timings: dict[str, float] = {}
    started = time.time()
    serve = _spawn([str(BIN / "rayllm"), "serve", "--prefect-file", str(variant), "--limit", "1"], env, serve_log, cwd=tmp_path)
    try:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with _api(url) as client:
            by_name = DeploymentFilter(name=DeploymentFilterName(any_=["batch-every-15s"]))
            deadline = time.time() + 300
            while True:  # the schedule creates a run, and the serving process picks it up
                assert serve.poll() is None, _tail(serve_log)
                runs = client.read_flow_runs(deployment_filter=by_name)
                picked = [r for r in runs if r.state and not r.state.is_scheduled()]
                if picked:
                    break
                assert time.time() < deadline, (
                    f"no scheduled run started; runs: {[(r.name, r.state_type) for r in runs]}\n{_tail(serve_log)}"
                )
                time.sleep(2)
            run = picked[0]
            (deployment,) = [d for d in client.read_deployments() if d.name == "batch-every-15s"]
            client.pause_deployment(deployment.id)  # one run is enough
            for other in client.read_flow_runs(deployment_filter=by_name):
                if other.id != run.id and other.state and other.state.is_scheduled():
                    client.delete_flow_run(other.id)
            timings["schedule fired, run picked up"] = time.time() - started
            run = _wait_for_run(client, run.id, 900, [serve_log])
            timings["scheduled run Completed"] = time.time() - started
            assert run.auto_scheduled, "the run was not created by the schedule"
            assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [15.0]
            assert deployment.work_pool_name is None  # served by the process, no worker
        assert (tmp_path / "scheduled" / "results.jsonl").exists()
    finally:
        _stop(serve)
        print(f"\ntimings after `rayllm serve` started (s): { {k: round(v, 1) for k, v in timings.items()} }; log: {serve_log}")
