"""A local Prefect server that outlives the command that started it: `rayllm demo --ui` runs the
demo against it, so a newcomer can open the runs, their artifacts and logs afterwards.

It is started detached: its own session, outside this command's supervision (see
`rayllm_stages.runtime.supervision`), its database under the demo's folder. A server already
answering on the port is reused. `stop_ui_server` ends the one this module started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefect_rayllm.rayllm_stages.runtime.supervision import ENABLE_ENV, OWNERS_ENV

PID_FILE = "server.pid"
START_TIMEOUT_S = 180


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def is_serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(api_url(port) + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_ui_server(home: Path, port: int = 4200) -> tuple[str, bool]:
    """The API URL of a Prefect server on 127.0.0.1:`port`, and whether this call started it.

    Raises:
        RuntimeError: it did not answer within START_TIMEOUT_S (its log is named).
    """
    if is_serving(port):
        return api_url(port), False
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (OWNERS_ENV, "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **{ENABLE_ENV: "0"})
    log = home / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in this command's process group: it stays when the command ends
        )
    (home / PID_FILE).write_text(str(process.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if is_serving(port):
            return api_url(port), True
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {process.returncode}; log: {log}")
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer on port {port} in {START_TIMEOUT_S} s; log: {log}")


def stop_ui_server(home: Path) -> bool:
    """Stop the server `start_ui_server` started with this home; False when none was running."""
    pid_file = home / PID_FILE
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
