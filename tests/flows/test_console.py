"""A command's console: progress and a summary by default; Prefect's log lines as text or JSON when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from prefect_rayllm.flows.console import apply_console_settings, configure_console
configure_console(sys.argv[1])  # as the CLI does, before anything is imported
from prefect import flow, get_run_logger
apply_console_settings()  # as the CLI does once its runtimes run

@flow(name="console-probe")
def probe():
    get_run_logger().info("marker-info-3c9e")
    get_run_logger().warning("marker-warning-3c9e")
    try:
        raise ValueError("boom")
    except ValueError:
        get_run_logger().exception("marker-error-3c9e")

probe()
"""


@pytest.mark.parametrize("log_format", ["progress", "text", "json"])
def test_log_format_decides_what_reaches_the_console(prefect_server, log_format):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_LOGGING_HANDLERS_CONSOLE")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, log_format], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "marker-" in line]
    if log_format == "progress":  # warnings and errors only, one line each
        assert len(lines) == 2 and "marker-warning-3c9e" in lines[0] and "marker-error-3c9e" in lines[1], run.stderr
        assert "Traceback" not in run.stderr
    elif log_format == "text":
        assert any("marker-info-3c9e" in line and "Flow run" in line for line in lines), run.stderr
        assert "Traceback" in run.stderr
    else:
        records = [json.loads(line) for line in lines]
        assert {r["message"] for r in records} >= {"marker-info-3c9e", "marker-warning-3c9e", "marker-error-3c9e"}, run.stderr
