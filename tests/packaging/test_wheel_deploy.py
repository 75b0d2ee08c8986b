"""The built wheel, installed in a fresh environment, deploys every deployment of its prefect.yaml
to a real Prefect server with parameters that work there: the example inputs ship in the wheel.

The environment is a new venv with the wheel installed and, through a .pth line, the test
environment's site-packages for the dependencies (torch, vLLM, Ray and Prefect are not installed
again); that line does not run the editable install's finder, so `prefect_rayllm` is the wheel's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

DEPLOYMENTS = {"batch", "chain", "nightly", "weekly-candidate", "colours"}


def _install(wheel: Path, venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "rayllm_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return python


def _paths(value) -> list[str]:
    """Every string in the parameters that names a local file (the example inputs)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return [value] if isinstance(value, str) and value.endswith(".jsonl") else []


@pytest.mark.slow
def test_installed_wheel_deploys_every_deployment_with_working_parameters(tmp_path, built_wheel):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.schema_tools.validation import validate

    from prefect_rayllm.deployments.server import LocalPrefectServer

    wheel = built_wheel
    venv = tmp_path / "venv"
    python = _install(wheel, venv)
    installed = subprocess.check_output(
        [str(python), "-c", "import prefect_rayllm.deployments.project as p; print(p.EXAMPLES_DIR)"], cwd=tmp_path, text=True
    ).strip()
    assert Path(installed).is_relative_to(venv) and Path(installed, "data", "requests.jsonl").is_file()

    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLLM_") and k not in ("PYTHONPATH", "PREFECT_API_URL")}
    with LocalPrefectServer(home=tmp_path / "prefect", ui=False, log_path=tmp_path / "server.log") as server:
        env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(tmp_path / "prefect"))
        deployed = subprocess.run(
            [str(python), "-m", "prefect_rayllm.flows.cli", "deploy"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == DEPLOYMENTS
            for name, deployment in deployments.items():
                assert deployment.enforce_parameter_schema, name
                validate(deployment.parameters, deployment.parameter_openapi_schema, raise_on_error=True)
                assert "{{ $" not in json.dumps(deployment.parameters), name
                for path in _paths(deployment.parameters):
                    assert Path(path).is_relative_to(installed) and Path(path).is_file(), (name, path)
            assert {name for name, d in deployments.items() if _paths(d.parameters)} == DEPLOYMENTS - {"nightly"}  # S3 source
            (automation,) = [a for a in client.read_automations() if a.name == "rollout-colours-when-candidate-passes"]
            assert automation.actions[0].deployment_id == deployments["colours"].id
            rollout_dataset = automation.actions[0].parameters["config"]["evaluation"]["dataset"]["path"]
            assert Path(rollout_dataset).is_relative_to(installed), rollout_dataset

        # the package's own check of each entry against its flow, run by the installed code
        checked = subprocess.run(
            [
                str(python),
                "-c",
                "from prefect_rayllm.deployments.project import deployment_specs\n"
                "import typing\n"
                "for spec in deployment_specs():\n"
                "    model = typing.get_type_hints(spec.load_flow().fn)['config']\n"
                "    model.model_validate(spec.parameters['config'])\n"
                "    print(spec.name)\n",
            ],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert checked.returncode == 0, checked.stderr
        assert set(checked.stdout.split()) == DEPLOYMENTS
