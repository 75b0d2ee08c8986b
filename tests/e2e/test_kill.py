"""A `rayllm` command killed with SIGKILL leaves nothing behind: not its temporary Prefect server,
not its local Ray (GCS, raylet, workers), not the vLLM engine, not a writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO

from prefect_rayllm.rayllm_stages.runtime import supervision
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

COLOURS = [q.split()[1] for q, _ in TOY_TASK]


def _tree(pid: int) -> dict[int, tuple[float, str]]:
    """The process and its descendants: pid -> (start time, command line)."""
    found = {}
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                found[proc.pid] = (proc.create_time(), " ".join(proc.cmdline())[:160] or proc.name())
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return found


def _survivors(seen: dict[int, tuple[float, str]]) -> dict[int, str]:
    alive = {}
    for pid, (created, cmdline) in seen.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = cmdline
        except psutil.Error:
            continue
    return alive


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


@pytest.mark.slow
def test_sigkill_of_rayllm_chain_leaves_no_process_behind(tmp_path, tiny_models):
    rows = [{"cid": f"c{i}", "colour": COLOURS[i % len(COLOURS)]} for i in range(20_000)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "chain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "in.jsonl"),
                "output": str(tmp_path / "out"),
                "id_column": "cid",
                "steps": [
                    {
                        "name": "answer",
                        "model": {"source": str(tiny_models["good"]), "engine_kwargs": {"max_model_len": 256}, "batch_size": 16},
                        "prompt": {"user": "Is {{ colour }} warm or cool?"},
                        "sampling": {"max_tokens": 8},
                        "output_column": "answer",
                    }
                ],
            }
        )
    )
    # As a user runs it: no PREFECT_API_URL, so the command starts its own temporary Prefect server.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAYLLM_OWNERS")}
    log = open(tmp_path / "cli.log", "w")
    command = subprocess.Popen(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "chain", str(config), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: dict[int, tuple[float, str]] = {}
    try:
        # Mid-run: rows are being committed, or the vLLM engine has been answering for a while.
        deadline = time.monotonic() + 1200
        engine_up: float | None = None
        while not any(name.endswith(".part") for name in _files(tmp_path / "out")):
            assert command.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the engine did not start in 20 minutes"
            seen.update(_tree(command.pid))
            if engine_up is None and any("EngineCore" in c for _, c in seen.values()):
                engine_up = time.monotonic()
            if engine_up is not None and time.monotonic() - engine_up > 20:
                break
            time.sleep(2)
        time.sleep(3)
        seen.update(_tree(command.pid))
        assert command.poll() is None, "the chain finished before it could be killed; give it more rows"
        kinds = {
            "prefect server": any("prefect.server.api.server:create_app" in c for _, c in seen.values()),
            "ray gcs": any("gcs_server" in c for _, c in seen.values()),
            "raylet": any("raylet" in c for _, c in seen.values()),
            "vllm engine": any("EngineCore" in c for _, c in seen.values()),
        }
        assert all(kinds.values()), (kinds, sorted(c for _, c in seen.values()))

        os.kill(command.pid, signal.SIGKILL)
        killed = time.monotonic()
        command.wait(30)
        time.sleep(max(0.0, 10 - (time.monotonic() - killed)))
        left = _survivors({pid: v for pid, v in seen.items() if pid != command.pid})
        assert left == {}, f"alive 10 s after SIGKILL: {left}"
        # Nor anything it started that the walks above missed (its mark is in their environment).
        marked = [p.pid for p in psutil.process_iter() if any(o.pid == command.pid for o in supervision.owners_of(p))]
        assert marked == [], f"processes marked as the command's, alive 10 s after SIGKILL: {marked}"
        written = _files(tmp_path / "out")
        time.sleep(3)
        assert _files(tmp_path / "out") == written, "something still writes the output after the command is gone"
        print(f"\n{len(seen) - 1} processes started by `rayllm chain`; none alive 10 s after SIGKILL")
    finally:
        for pid in _survivors(seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()
