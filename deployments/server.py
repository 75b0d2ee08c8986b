"""A local `prefect server start` (SQLite under PREFECT_HOME) as a subprocess we own.

`rayllm serve` starts one when no Prefect API is configured: schedules need the server's
scheduler, which Prefect's ephemeral server does not run. The end-to-end tests start one on a
free loopback port with their own PREFECT_HOME.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


class LocalPrefectServer:
    """`prefect server start` on `host:port` with its own PREFECT_HOME; a context manager.

    Example:
        ```python
        with LocalPrefectServer(home=tmp / "prefect", ui=False) as server:
            os.environ["PREFECT_API_URL"] = server.api_url
        ```
    """

    def __init__(
        self,
        home: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        ui: bool = True,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.home = Path(home) if home else None
        self.host = host
        self.port = port or free_port(host)
        self.ui = ui
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the server and wait until `/api/health` answers; returns the API URL.

        Raises:
            RuntimeError: the server exited or did not answer in time (the log's path is named).
        """
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **self.extra_env}
        for name in (
            "PREFECT_API_URL",
            "PREFECT_API_KEY",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
        ):
            env.pop(name, None)
        if self.home:
            self.home.mkdir(parents=True, exist_ok=True)
            env["PREFECT_HOME"] = str(self.home)
        command = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ui" if self.ui else "--no-ui",
        ]
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while not api_healthy(self.api_url):
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"prefect server exited with {self.process.returncode}; log: {self.log_path}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"prefect server did not answer in {timeout_s:.0f} s; log: {self.log_path}")
            time.sleep(0.5)
        return self.api_url

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server and its process group (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            stop_process_group(process, grace_s)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> LocalPrefectServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process's group (it was started with start_new_session=True), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)
