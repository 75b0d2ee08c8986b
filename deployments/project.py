"""The deployments of prefect.yaml, read once for `rayllm deploy`, `rayllm serve` and the tests.

prefect.yaml is the one place where deployments are defined: `rayllm deploy` hands it to
`prefect deploy` (work pool + worker), `rayllm serve` turns the same entries into
`flow.to_deployment(...)` objects for `prefect.serve` (no worker).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"
PROJECT_ROOT = PREFECT_FILE.parent.parent
RETRY_ENV = ("PREFECT_FLOWS_DEFAULT_RETRIES", "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS")
# The example inputs the deployments' parameters read ship in the package, here; prefect.yaml names
# the folder `{{ $RAYLLM_EXAMPLES }}`, filled in when deploying (from the environment, as Prefect does).
EXAMPLES_DIR = PREFECT_FILE.parent / "examples"
EXAMPLES_ENV = "RAYLLM_EXAMPLES"
EXAMPLES_PLACEHOLDER = "{{ $" + EXAMPLES_ENV + " }}"


@dataclass
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments:` (YAML anchors and merge keys resolved)."""

    name: str
    entrypoint: str
    parameters: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    schedules: list[dict[str, Any]] = field(default_factory=list)
    concurrency_limit: int | dict[str, Any] | None = None
    triggers: list[dict[str, Any]] = field(default_factory=list)
    work_pool: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The flow-run environment the work pool's job variables set."""
        return {k: str(v) for k, v in ((self.work_pool.get("job_variables") or {}).get("env") or {}).items()}

    def load_flow(self):
        """The flow object behind `entrypoint` (`module.path:function`)."""
        from prefect.flows import load_flow_from_entrypoint

        return load_flow_from_entrypoint(self.entrypoint, use_placeholder_flow=False)

    def configured_flow(self):
        """The flow with the retries the work pool's environment gives it on a worker
        (PREFECT_FLOWS_DEFAULT_RETRIES, PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS)."""
        flow, env = self.load_flow(), self.env
        if RETRY_ENV[0] in env:
            flow = flow.with_options(retries=int(env[RETRY_ENV[0]]), retry_delay_seconds=float(env.get(RETRY_ENV[1], 0)))
        return flow


def examples_dir() -> str:
    """The examples folder deployments point at: $RAYLLM_EXAMPLES, else the installed package's."""
    return os.environ.get(EXAMPLES_ENV) or str(EXAMPLES_DIR)


def fill_examples(value: Any, folder: str | None = None) -> Any:
    """`value` with `{{ $RAYLLM_EXAMPLES }}` replaced by the examples folder, as `prefect deploy` does."""
    if isinstance(value, dict):
        return {k: fill_examples(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_examples(v, folder) for v in value]
    if isinstance(value, str) and EXAMPLES_PLACEHOLDER in value:
        return value.replace(EXAMPLES_PLACEHOLDER, folder or examples_dir())
    return value


def load_project(prefect_file: str | Path = PREFECT_FILE) -> dict[str, Any]:
    """prefect.yaml as a mapping (anchors and `<<` merge keys resolved, as Prefect reads it)."""
    return yaml.safe_load(Path(prefect_file).read_text()) or {}


def deployment_specs(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None) -> list[DeploymentSpec]:
    """The deployments of `prefect_file`, optionally only those named (deployment or flow/deployment names),
    with `{{ $RAYLLM_EXAMPLES }}` filled in (parameters and triggers) as `rayllm deploy` registers them.

    Raises:
        ValueError: a name matches no deployment (the known names are listed).
    """
    specs = []
    for entry in load_project(prefect_file).get("deployments") or []:
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                parameters=fill_examples(entry.get("parameters") or {}),
                tags=list(entry.get("tags") or []),
                description=entry.get("description"),
                schedules=list(entry.get("schedules") or []),
                concurrency_limit=entry.get("concurrency_limit"),
                triggers=fill_examples(list(entry.get("triggers") or [])),
                work_pool=entry.get("work_pool") or {},
            )
        )
    if names:
        known = {spec.name for spec in specs}
        unknown = [n for n in names if n.split("/")[-1] not in known]
        if unknown:
            raise ValueError(f"no deployment named {', '.join(unknown)} in {prefect_file} (it has: {', '.join(sorted(known))})")
        specs = [spec for spec in specs if spec.name in {n.split("/")[-1] for n in names}]
    return specs


def work_pool_names(specs: list[DeploymentSpec]) -> list[str]:
    return sorted({spec.work_pool["name"] for spec in specs if spec.work_pool.get("name")})


def ensure_process_work_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
    return True


def prefect_deploy_command(
    prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None, pool: str | None = None
) -> list[str]:
    """The `prefect deploy` command line `rayllm deploy` runs."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(Path(prefect_file).resolve())]
    if names:
        for name in names:
            command += ["--name", name]
    else:
        command.append("--all")
    if pool:
        command += ["--pool", pool]
    return command


def deploy(
    prefect_file: str | Path = PREFECT_FILE,
    names: list[str] | None = None,
    pool: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Register the deployments against the configured Prefect API (PREFECT_API_URL).

    Creates the process work pool(s) first when missing, then runs `prefect --no-prompt deploy
    --all --prefect-file <file>` from the project root, so that the flows' module entrypoints import,
    with RAYLLM_EXAMPLES set (default: the package's examples folder) for the parameters' inputs.

    Raises:
        RuntimeError: no Prefect API is configured, or `prefect deploy` failed (its output is in the message).
    """
    from prefect.settings import PREFECT_API_URL

    if not (env or os.environ).get("PREFECT_API_URL") and not PREFECT_API_URL.value():
        raise RuntimeError(
            "no Prefect API configured: set PREFECT_API_URL (a `prefect server start` or Prefect Cloud), "
            "or use `rayllm serve`, which runs the deployments from one local process"
        )
    specs = deployment_specs(prefect_file, names)
    for name in [pool] if pool else work_pool_names(specs):
        ensure_process_work_pool(name)
    outcome = subprocess.run(
        prefect_deploy_command(prefect_file, names, pool),
        cwd=PROJECT_ROOT,
        env={**os.environ, EXAMPLES_ENV: examples_dir(), **(env or {})},
        capture_output=True,
        text=True,
    )
    if outcome.returncode != 0:
        raise RuntimeError(f"prefect deploy failed (exit {outcome.returncode}):\n{outcome.stdout}\n{outcome.stderr}")
    return outcome


if __name__ == "__main__":
    # `python -m prefect_rayllm.deployments.project examples`: the folder for RAYLLM_EXAMPLES.
    if sys.argv[1:] != ["examples"]:
        sys.exit("usage: python -m prefect_rayllm.deployments.project examples")
    print(EXAMPLES_DIR)
