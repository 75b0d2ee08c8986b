"""Ray worker output reaches the Prefect run log at the chosen level, without a flood."""

from __future__ import annotations

import logging
import time

import pytest

from prefect_rayllm.rayllm_stages.runtime import worker_logs as ray_logs


@pytest.mark.parametrize(
    "line, level",
    [
        ("INFO 11-24 10:00:00 [engine.py:12] Initializing a V1 LLM engine", logging.INFO),
        ("WARNING 11-24 10:00:00 [cpu.py:80] Pin memory is not available", logging.WARNING),
        ("2026-11-24 10:00:00,123\tERROR worker.py:12 -- task failed", logging.ERROR),
        ("[2026-11-24 10:00:00] DEBUG something", logging.DEBUG),
        ("Traceback (most recent call last):", logging.ERROR),
        ("ValueError: bad row", logging.ERROR),
        ("/x/y.py:3: UserWarning: deprecated", logging.WARNING),
        ("just a print from an actor", logging.INFO),
    ],
)
def test_line_levels(line, level):
    assert ray_logs.line_level(line) == level


def test_level_setting(monkeypatch):
    monkeypatch.delenv(ray_logs.LEVEL_ENV, raising=False)
    assert ray_logs.resolve_level() == logging.WARNING
    monkeypatch.setenv(ray_logs.LEVEL_ENV, "info")
    assert ray_logs.resolve_level() == logging.INFO
    assert ray_logs.resolve_level("OFF") > logging.CRITICAL
    with pytest.raises(ValueError, match="RAYLLM_RAY_LOG_LEVEL: unknown level 'LOUD'"):
        ray_logs.resolve_level("LOUD")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_forwarder_filters_level_repeats_and_caps_the_rate(caplog):
    clock = _Clock()
    forwarder = ray_logs.WorkerLogForwarder(logging.getLogger("t"), logging.WARNING, max_lines_per_minute=5, clock=clock)
    batch = {
        "pid": 7,
        "actor_name": "MapWorker(vLLM)",
        "lines": [
            "INFO 11-24 10:00:00 [a.py:1] chatter",
            "WARNING 11-24 10:00:00 [a.py:1] slow step 1",
            "WARNING 11-24 10:00:01 [a.py:1] slow step 2",  # the same line but for numbers: a repeat
            "12:00:00.123 | WARNING | Task run 'x' - already in the API",
        ],
    }
    with caplog.at_level(logging.DEBUG, logger="t"):
        forwarder(batch)
        assert [r.getMessage() for r in caplog.records] == [
            "[ray MapWorker(vLLM) pid=7] WARNING 11-24 10:00:00 [a.py:1] slow step 1"
        ]
        forwarder({"pid": 8, "lines": [f"ERROR distinct failure {chr(97 + i)}" for i in range(20)]})
        assert forwarder.forwarded == 5 and forwarder.suppressed == 16 and forwarder.repeats == 1
        clock.now = 61
        forwarder({"pid": 8, "lines": ["ERROR after a minute"]})
    assert caplog.records[-1].levelno == logging.ERROR
    assert "16 earlier lines over the 5/min cap not shown" in caplog.records[-1].getMessage()


def test_worker_lines_reach_the_flow_run_log_at_the_chosen_level(prefect_server, ray_session, monkeypatch):
    """Lines land in the flow run's log (not in `connect-ray`'s), and in the log of the task that
    runs the engine while it runs."""
    import ray
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import FlowRunContext, TaskRunContext

    from prefect_rayllm.tasks.runtime import connect_ray, worker_logs_to_task

    @ray.remote
    def chatty(n: int, marker: str) -> int:
        print("INFO 11-24 10:00:00 [worker.py:1] routine progress line", flush=True)
        print(f"WARNING 11-24 10:00:00 [worker.py:2] {marker}: KV cache is small", flush=True)
        for i in range(n):
            print(f"ERROR flood line {'x' * (i % 50)}{chr(65 + i % 26)}", flush=True)
        return n

    monkeypatch.setenv(ray_logs.LEVEL_ENV, "WARNING")
    monkeypatch.setenv(ray_logs.MAX_LINES_ENV, "20")

    @task(name="run-engine")
    @worker_logs_to_task
    def run_engine() -> str:
        ray.get(chatty.remote(0, "marker-engine-task-5d1c"))
        time.sleep(3)  # Ray ships worker output to the driver asynchronously
        return str(TaskRunContext.get().task_run.id)

    @flow(name="ray-logs-probe")
    def probe() -> tuple[str, str]:
        connect_ray()
        engine_task_id = run_engine()  # before the flood below uses up the per-minute cap
        ray.get(chatty.remote(300, "marker-warning-7f3a"))
        time.sleep(3)
        return str(FlowRunContext.get().flow_run.id), engine_task_id

    run_id, engine_task_id = probe()
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            messages = [log.message for log in logs]
            if (
                any("marker-warning-7f3a" in m for m in messages) and any("marker-engine-task-5d1c" in m for m in messages)
            ) or time.time() > deadline:
                break
            time.sleep(1)
    ray_lines = [m for m in messages if m.startswith("[ray ")]
    assert any("marker-warning-7f3a" in m for m in ray_lines), messages
    assert not any("routine progress line" in m for m in ray_lines)
    assert 2 <= len(ray_lines) <= 20, len(ray_lines)  # 301 lines at WARNING or above, capped
    (flow_line,) = [log for log in logs if "marker-warning-7f3a" in log.message]
    (task_line,) = [log for log in logs if "marker-engine-task-5d1c" in log.message]
    assert flow_line.task_run_id is None, "a flow-level worker line is attached to a task"
    assert str(task_line.task_run_id) == engine_task_id


def test_importing_ray_serve_llm_leaves_the_root_logger_alone():
    """Ray Serve LLM's import replaces the root logger's handlers with a JSON one at INFO (every
    library's INFO records, HTTP requests included, then reach the console as JSON)."""
    import subprocess
    import sys

    script = """
import logging
logging.basicConfig(level=logging.WARNING, format="plain %(message)s")
before = [type(h.formatter).__name__ for h in logging.getLogger().handlers]
from prefect_rayllm.rayllm_stages.runtime import worker_logs
worker_logs.keep_root_logging()
import ray.serve.llm  # noqa: F401
after = [type(h.formatter).__name__ for h in logging.getLogger().handlers]
print(before == after, logging.getLogger().level == logging.WARNING, after)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("True True"), run.stdout
