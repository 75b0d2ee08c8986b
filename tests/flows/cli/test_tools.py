"""`rayllm validate` understands every job kind, and every example config validates: on its own,
and with its input where that input exists (local files, tiny models, a local S3 server)."""

import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, openai_line
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
KIND_OF = {"batch": "batch", "chain": "chain", "eval": "evaluation", "curate": "curation", "rollout": "rollout"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_config_of_its_kind(example: Path) -> None:
    outcome = CliRunner().invoke(app, ["validate", str(example), "--no-input"])
    assert outcome.exit_code == 0, outcome.output
    kind = KIND_OF[example.name.split("-")[0]]
    assert outcome.output == f"ok: {example} is a valid {kind} config (input not checked)\n"


@pytest.fixture
def own_s3fs_instances():
    """fsspec caches filesystems by their arguments, not the environment: a test that points S3 at
    another endpoint must not leave its instance for a later test that reaches the same bucket."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_in_a_fresh_checkout_with_a_warning_for_what_is_not_there(
    example: Path, tmp_path, monkeypatch
) -> None:
    """Where the examples' models and data are not built yet, validate says so and exits 0;
    --strict makes the first missing input an error with its path named."""
    monkeypatch.chdir(tmp_path)  # nothing the examples name exists here
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # s3://my-bucket unreachable at once
    outcome = CliRunner().invoke(app, ["validate", str(example)])
    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.startswith(f"ok: {example} is a valid ")
    strict = CliRunner().invoke(app, ["validate", str(example), "--strict"])
    if "warning: " in outcome.output:
        warning = outcome.output.split("warning: ", 1)[1].strip()
        assert strict.exit_code == 2 and warning in strict.output
    else:
        assert strict.exit_code == 0


@pytest.fixture
def examples_workdir(tmp_path: Path, tiny_models, tiny_vlm, local_s3, monkeypatch) -> Path:
    """A working directory where every example's input exists: the examples and their data, the
    tiny models under the names the examples use, the image corpus, and `s3://my-bucket` on a
    local S3 server that the examples reach through AWS_ENDPOINT_URL (they carry no endpoint)."""
    from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus

    (tmp_path / "examples").symlink_to(REPO / "examples")
    models = tmp_path / "models"
    models.mkdir()
    for name, folder in {"tiny": tiny_models["good"], "tiny-untrained": tiny_models["bad"], "tiny-vlm": tiny_vlm}.items():
        (models / name).symlink_to(folder)
    (models / "rewriter").symlink_to(tiny_models["good"])  # validate checks the folder, not its training
    build_corpus(str(tmp_path / ".rayllm" / "image-corpus"))
    bucket = local_s3.filesystem()
    if not bucket.exists("my-bucket"):
        local_s3.create_bucket("my-bucket")
    with bucket.open("my-bucket/requests.jsonl", "w") as handle:
        handle.write(openai_line("r1", "Is red warm or cool?") + "\n")
    table = io.BytesIO()
    pq.write_table(pa.table({"question_id": ["q1"], "raw_question": ["is red warm"]}), table)
    bucket.pipe("my-bucket/raw-questions.parquet", table.getvalue())
    bucket.pipe("my-bucket/images/cat.png", (tmp_path / ".rayllm" / "image-corpus" / "images" / "a-shapes.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "AWS_ENDPOINT_URL": local_s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    import s3fs

    # fsspec caches filesystems by their arguments, not the environment: an instance made earlier
    # in this process under another environment must not answer for this one, nor ours for later.
    s3fs.S3FileSystem.clear_instance_cache()
    yield tmp_path
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_example_validates_with_its_input(examples_workdir: Path) -> None:
    for example in EXAMPLES:
        relative = f"examples/{example.name}"
        outcome = CliRunner().invoke(app, ["validate", relative], env=dict(os.environ))
        assert outcome.exit_code == 0, (example.name, outcome.output)
        assert outcome.output.startswith(f"ok: {relative} is a valid {KIND_OF[example.name.split('-')[0]]} config; "), (
            outcome.output
        )


def test_validate_reports_what_it_checked(tmp_path: Path) -> None:
    shutil.copy(REPO / "examples" / "data" / "colours.jsonl", tmp_path / "colours.jsonl")
    config = tmp_path / "chain.yaml"
    step = {"name": "answer", "model": {"source": "m"}, "prompt": {"user": "{{ colour }}"}, "output_column": "answer"}
    config.write_text(
        json.dumps({"input": str(tmp_path / "colours.jsonl"), "output": "out/", "id_column": "cid", "steps": [step]})
    )
    rows = sum(1 for line in (tmp_path / "colours.jsonl").read_text().splitlines() if line.strip())
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 0, outcome.output
    assert (
        outcome.output
        == f"ok: {config} is a valid chain config; {tmp_path}/colours.jsonl is a jsonl table with {rows} rows; steps: answer\n"
    )


def test_validate_takes_the_kind_when_the_keys_do_not_tell(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("output: out/\nmodel: {source: m}\n")
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 2
    assert "cannot tell the job kind from its keys (model, output); give it with --kind (batch, curation)" in outcome.output
    outcome = CliRunner().invoke(app, ["validate", str(config), "--kind", "curation", "--no-input"])
    assert outcome.exit_code == 2 and "source: Field required" in outcome.output


def test_validate_names_the_bad_key_with_its_line_and_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text(
        "name: colours\ndataset: {path: d.jsonl}\noutput: out/\ntargets: [{name: t, model: {source: m}}]\n"
        "metrics: [{type: exact_match}]\nbasline: {last_run: true}\n"
    )
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 2
    assert outcome.output == f"error: {config} is invalid:\n  line 6: basline: unknown key (did you mean 'baseline'?)\n"


def test_validate_names_the_yaml_error_with_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "rollout.yaml"
    config.write_text("endpoint: colours\nmodel_id: colours\ncandidate: {source: ./m\nsmoke: []\n")
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 2
    assert outcome.output.startswith(f"error: {config} is not valid YAML: line 4, column 6: ")
    assert "Traceback" not in outcome.output
