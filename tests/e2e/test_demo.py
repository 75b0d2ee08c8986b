import json
import time

import pytest
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app


@pytest.mark.slow
def test_demo_runs_everything_locally_and_leaves_its_runs_in_a_prefect_ui(tmp_path, ray_session):
    """`rayllm demo --ui`: the newcomer's path. The runs land in a local Prefect server that is
    still up after the command, with their artifacts; `--stop-ui` ends it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_rayllm.deployments.server import free_port
    from prefect_rayllm.flows.ui_server import is_serving

    port = free_port()
    outcome = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--rows", "24", "--ui", "--ui-port", str(port)])
    try:
        assert outcome.exit_code == 0, outcome.output
        assert f"Open http://127.0.0.1:{port}/runs" in outcome.output and is_serving(port)
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
            assert len(runs) >= 3 and all(run.state.is_completed() for run in runs), [(r.name, r.state) for r in runs]
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs]))
            )
        keys = {a.key for a in artifacts if a.key}
        assert any(k.startswith("batch-report-") for k in keys) and any(k.startswith("curation-report-") for k in keys), keys
    finally:
        stopped = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--stop-ui"])
    assert "stopped" in stopped.output
    for _ in range(60):
        if not is_serving(port):
            break
        time.sleep(0.5)
    assert not is_serving(port)
    manifest = json.loads((tmp_path / "run-1" / "manifest.json").read_text())
    assert manifest["counts"] == {**manifest["counts"], "total": 26, "completed": 24, "failed": 2}
    assert manifest["input"]["url"].startswith("s3://rayllm-demo/")
    assert len((tmp_path / "run-1" / "results.jsonl").read_text().splitlines()) == 24
    evaluation = json.loads((tmp_path / "eval-1" / "metrics.json").read_text())
    assert evaluation["passed"] is True
    assert evaluation["summaries"]["tiny-chat"]["metrics"]["exact_match"]["mean"] == 1.0
    curation = json.loads((tmp_path / "curation-1" / "manifest.json").read_text())
    counts = curation["counts"]
    assert (
        curation["job"] == "curation" and counts["total"] == counts["completed"] + counts["failed"] and counts["completed"] == 8
    )


def test_help_documents_every_command():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in ("batch", "chain", "evaluate", "curate", "validate", "make-tiny-model", "demo"):
        assert command in top.output
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_validate_names_the_bad_key(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("input: x.jsonl\noutput: out/\nmodel: {source: m, engin: vllm}\n")
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 2
    assert "model.engin: unknown key" in outcome.output
