"""Shared, real test infrastructure: one Prefect server, one local Ray, tiny models, a local S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Before prefect or ray are imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rayllm-test-prefect-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAYLLM_CACHE_DIR", tempfile.mkdtemp(prefix="rayllm-test-cache-"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest
from hypothesis import HealthCheck, Phase, settings

REPO = Path(__file__).resolve().parents[1]

# Property-based tests (hypothesis): "ci" (the default) runs few generated examples, the same ones
# every run (derandomized, no example database), so CI time stays flat; "nightly" runs many, new
# ones each time, and keeps failing examples in .hypothesis/ to replay them. Select with
#     RAYLLM_HYPOTHESIS_PROFILE=nightly .venv/bin/python -m pytest -p no:cacheprovider \
#         tests/e2e/test_batch_properties.py tests/e2e/test_chain_properties.py tests/rayllm_stages/llm/
# Each test sets its own example counts through `examples(ci=..., nightly=...)`.
# CI does not shrink a failing example (an example is a whole job, seconds each): it reports it as found.
HYPOTHESIS_PROFILE = os.environ.get("RAYLLM_HYPOTHESIS_PROFILE", "ci")
_slow_ok = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=_slow_ok,
    print_blob=True,
)
settings.register_profile("nightly", deadline=None, suppress_health_check=_slow_ok, print_blob=True)
settings.load_profile(HYPOTHESIS_PROFILE)


NIGHTLY = os.environ.get("RAYLLM_NIGHTLY") == "1"


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.nightly` tests run only with RAYLLM_NIGHTLY=1 (`make test-nightly`): they
    cover what faster tests already reach, at a scale or through a path that takes minutes."""
    if NIGHTLY:
        return
    skip = pytest.mark.skip(reason="nightly: set RAYLLM_NIGHTLY=1 (make test-nightly)")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


def examples(ci: int, nightly: int) -> int:
    """A property test's example count under the selected profile."""
    return nightly if HYPOTHESIS_PROFILE == "nightly" else ci


def openai_line(custom_id: str, content, max_tokens: int = 8, **body) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **body},
        }
    )


CONSOLE_ENV = (
    "RAYLLM_LOG_FORMAT",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER",
    "RAY_LOGGER_LEVEL",
)


CONSOLE_ENV_AT_START = {name: os.environ.get(name) for name in CONSOLE_ENV}


def _restore_console_env() -> None:
    for name, value in CONSOLE_ENV_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _console_env_restored():
    """An in-process `rayllm` command sets its console format in this process's environment, and
    every later subprocess inherits it (a `--log-format text` child then printed no INFO lines).
    Each test starts and ends with the environment the session started with: a session fixture
    that ran the CLI (the tiny VLM's) before this test's setup is undone too."""
    _restore_console_env()
    yield
    _restore_console_env()


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (the test harness) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process test."""
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    ray_runtime.connect()
    yield
    ray_runtime.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A trained ("good") and an untrained ("bad") tiny chat model, built once."""
    from prefect_rayllm.rayllm_stages.testing.tiny_models import build_tiny_chat_model

    root = tmp_path_factory.mktemp("models")
    return {
        "good": build_tiny_chat_model(root / "tiny-good", trained=True),
        "bad": build_tiny_chat_model(root / "tiny-bad", trained=False),
    }


@pytest.fixture(scope="session")
def shared_serve_engine(ray_session, tiny_models):
    """One real CPU vLLM engine (the good tiny model, context 256) hosted by Ray Serve for the whole
    session, so that property tests can run many small jobs without starting an engine each; yields
    the `model` config that reaches it."""
    from prefect_rayllm.rayllm_stages.config.models import ModelSpec
    from prefect_rayllm.rayllm_stages.llm.serve_engine import delete_engine, ensure_engine

    model = {
        "source": str(tiny_models["good"]),
        "id": "tiny-shared",
        "engine": "serve",
        "serve_app": "rayllm-test-session-engine",
        "keep_serving": True,
        "engine_kwargs": {"max_model_len": 256},
        "batch_size": 4,
    }
    engine = ensure_engine(ModelSpec.model_validate(model), gpu=False)
    yield model
    delete_engine(engine.app_name)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny vision-language model (Idefics3, random weights), built by the CLI once."""
    from typer.testing import CliRunner

    from prefect_rayllm.flows.cli import app

    folder = tmp_path_factory.mktemp("models") / "tiny-vlm"
    outcome = CliRunner().invoke(app, ["make-tiny-model", str(folder), "--vision"])
    assert outcome.exit_code == 0, outcome.output
    return folder


@pytest.fixture(scope="session")
def local_s3():
    """A real S3-protocol server (moto) on 127.0.0.1."""
    from prefect_rayllm.rayllm_stages.testing.local_s3 import start_local_s3

    server = start_local_s3()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OPENAI_SERVER_KEY = "sk-test-7f3a9c-not-a-real-key"


@pytest.fixture(scope="session")
def openai_server(tiny_models):
    """vLLM's own OpenAI-compatible server on loopback, serving the good tiny model, with an API key."""
    port = _free_port()
    log = open(tempfile.mktemp(prefix="vllm-server-", suffix=".log"), "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_models["good"]),
            "--served-model-name",
            "tiny-good",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--gpu-memory-utilization",
            "0.1",
            "--api-key",
            OPENAI_SERVER_KEY,
            "--structured-outputs-config",
            json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {process.returncode}; log: {log.name}")
            try:
                request = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {OPENAI_SERVER_KEY}"})
                urllib.request.urlopen(request, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"vLLM server did not answer in 300 s; log: {log.name}") from None
                time.sleep(1)
        yield base_url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        log.close()


@pytest.fixture
def ray_head():
    """A separate Ray head node on loopback, (address, its temp dir); stopped by killing its own
    session's processes only."""
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime

    temp_dir = tempfile.mkdtemp(prefix="rayhead-")
    port = _free_port()
    subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            f"--port={port}",
            # Ports of our own: another Ray head on this machine (another test run) keeps its defaults.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=8",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=120,
    )
    yield f"127.0.0.1:{port}", temp_dir
    for proc in ray_runtime.session_processes(temp_dir):
        for child in [proc, *proc.children(recursive=True)]:
            try:
                child.kill()
            except Exception:
                pass


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The package's wheel, built once from a copy of the checkout (setuptools writes build/ and
    *.egg-info into the source folder)."""
    import shutil

    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "src"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".rayllm", "bench", "tests")
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [wheel] = folder.glob("prefect_rayllm-*.whl")
    return wheel
