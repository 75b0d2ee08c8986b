"""Ray workers of a flow's jobs never start a Prefect server of their own: they are refused one, and
pointed at the flow's Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os
import ray
from prefect import flow
from prefect_rayllm.tasks.runtime import connect_ray

@ray.remote
def worker_env():
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE
    return {"url": PREFECT_API_URL.value(), "ephemeral": PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value()}

@flow(name="worker-env-probe")
def probe():
    connect_ray()
    return ray.get(worker_env.remote())

print(json.dumps(probe()))
"""


def test_ray_workers_get_the_flow_s_prefect_api_and_no_server_of_their_own(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAYLLM_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"url": prefect_server, "ephemeral": False}
