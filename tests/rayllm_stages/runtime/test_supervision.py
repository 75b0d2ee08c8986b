"""Everything a supervised process starts ends with it, even when it is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from prefect_rayllm.rayllm_stages.runtime import supervision

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="supervision is Linux only")

# An owner that supervises itself, then starts a tree: a sleeper, and a Python child that starts
# its own sleeper in a new session (as a server or a daemonised helper might), then reports pids.
OWNER = r"""
import json, subprocess, sys, time
from prefect_rayllm.rayllm_stages.runtime import supervision
sup = supervision.supervise(reap=False)
sleeper = subprocess.Popen(["sleep", "600"])
nested = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys, time
p = subprocess.Popen(["sleep", "600"], start_new_session=True)
print(p.pid, flush=True)
time.sleep(600)
'''], stdout=subprocess.PIPE, text=True)
detached = int(nested.stdout.readline())
print(json.dumps({"watchdog": sup.watchdog_pid, "started": [sleeper.pid, nested.pid, detached]}), flush=True)
time.sleep(600)
"""


def _start_owner() -> tuple[subprocess.Popen, dict]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    line = owner.stdout.readline()
    assert line, "the owner did not start"
    return owner, json.loads(line)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def test_sigkill_of_the_owner_ends_everything_it_started():
    owner, info = _start_owner()
    started = info["started"]
    try:
        assert len(_alive(started)) == 3
        token = supervision.owners_of(psutil.Process(started[2]))
        assert supervision.Owner(owner.pid, psutil.Process(owner.pid).create_time()) in token
        os.kill(owner.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        owner.wait(10)
        assert _wait_gone(started + [info["watchdog"]], 10) == []
        print(f"\nall {len(started)} processes gone {time.monotonic() - killed_at:.1f} s after SIGKILL")
    finally:
        for pid in _alive(started + [owner.pid]):
            os.kill(pid, signal.SIGKILL)


def test_the_next_start_stops_what_a_killed_watchdog_left_behind():
    owner, info = _start_owner()
    started = info["started"]
    try:
        os.kill(info["watchdog"], signal.SIGKILL)  # as `kill -9` of a whole process group would
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        time.sleep(1)
        assert len(_alive(started)) == 3, "nothing should have stopped them yet"
        next_start = subprocess.run(
            [
                sys.executable,
                "-c",
                "from prefect_rayllm.rayllm_stages.runtime import supervision as s; print(len(s.reap_orphans()))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert next_start.returncode == 0, next_start.stderr
        assert int(next_start.stdout) >= 3
        assert _wait_gone(started, 5) == []
    finally:
        for pid in _alive(started + [owner.pid]):
            os.kill(pid, signal.SIGKILL)


def test_a_normal_exit_leaves_the_owner_s_work_to_the_watchdog_too():
    script = OWNER.replace("time.sleep(600)\n", "") + "\n"
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    info = json.loads(owner.stdout.readline())
    assert owner.wait(30) == 0
    assert _wait_gone(info["started"] + [info["watchdog"]], 10) == []
