import json

import pytest
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app


@pytest.mark.slow
def test_demo_runs_everything_locally(tmp_path, prefect_server, ray_session):
    outcome = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--rows", "24"])
    assert outcome.exit_code == 0, outcome.output
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
