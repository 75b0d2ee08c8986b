"""bench/scale_bench.py end to end, small: a two-node local Ray cluster, `rayllm batch` and raw Ray
Data LLM on 2,000 requests each, every row accounted for, the report's fields there, and nothing of
the cluster left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from prefect_rayllm.rayllm_stages.runtime.cluster import session_processes

ROWS = 2000


@pytest.mark.slow
def test_scale_bench_accounts_for_every_row_and_reports_the_driver(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # the CLI's own temporary server
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "scale_bench.py"),
            f"--rows={ROWS}",
            f"--peer-rows={ROWS}",
            "--no-warmup",
            "--timeout=900",
            f"--results-dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [path] = tmp_path.glob("scale-*.json")
    report = json.loads(path.read_text())
    assert path.with_suffix(".md").exists()

    assert [n["alive"] for n in report["cluster"]["nodes"]] == [True, True]
    ours, peer = report["results"]["ours"], report["results"]["peer"]
    assert ours["ok"] and ours["all_rows_accounted"], ours.get("error")
    assert ours["manifest_counts"]["completed"] + ours["manifest_counts"]["failed"] == ROWS
    assert ours["results_lines"] + ours["errors_lines"] == ROWS
    assert peer["ok"] and peer["output_lines"] == ROWS, peer.get("error")
    for result in (ours, peer):
        assert result["rows_per_s"] > 0
        driver = result["driver"]
        assert driver["samples"] > 0 and 0 < driver["peak_rss_mib"] < 4096
        for key in ("rss_at_10pct", "rss_at_50pct", "rss_at_90pct"):
            assert driver[key]["rss_mib"] > 0
        assert driver["cpu_s"] > 0 and driver["cpu_per_wall"] > 0 and 0 < driver["cpu_share_of_machine"] <= 1
        assert result["machine_cpu"]["busy_cpu_s"] >= driver["cpu_s"]
    assert ours["driver"]["children"]["seen"] >= 1  # the Prefect temporary server
    ratios = report["ratios"]
    for key in ("rows_per_s_ours_over_peer", "driver_peak_rss_ours_over_peer", "driver_cpu_share_ours_over_peer"):
        assert ratios[key] > 0
    assert "rows_per_s_ours_over_peer" in report["table_md"]

    work = Path(report["input"]["path"]).parent
    assert report["cluster_processes_killed"] > 0
    assert not work.exists()
    assert session_processes(str(work)) == []
