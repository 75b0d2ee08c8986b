"""Entrypoints of the deployments `rayllm serve` registers: `prefect_rayllm.deployments.served.<deployment name>`.

Each run of a served deployment imports its flow afresh in a subprocess; this module gives it the
flow of that prefect.yaml entry as a worker would run it (flow retries included). The file is the
one `rayllm serve` was given (`RAYLLM_PREFECT_FILE`), by default the package's prefect.yaml.
"""

from __future__ import annotations

import os

PREFECT_FILE_ENV = "RAYLLM_PREFECT_FILE"


def served_flow(name: str):
    """The configured flow of the deployment `name`."""
    from prefect_rayllm.deployments.project import PREFECT_FILE, deployment_specs

    (spec,) = deployment_specs(os.environ.get(PREFECT_FILE_ENV) or PREFECT_FILE, [name])
    return spec.configured_flow()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return served_flow(name)
    except ValueError as exc:
        raise AttributeError(str(exc)) from None
