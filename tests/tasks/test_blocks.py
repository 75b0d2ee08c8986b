"""Credential blocks: a config names a block, the Prefect layer turns it into storage options in memory,
and a block that is not there is one message naming it (exit 2 from the CLI, no traceback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app
from prefect_rayllm.rayllm_stages.config.base import ConfigError, set_credentials_resolver, with_credentials
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob
from prefect_rayllm.tasks.blocks import RayConnection, S3Credentials, storage_options_with_block, with_storage_credentials


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_block(prefect_server) -> tuple[str, S3Credentials]:
    block = S3Credentials(
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="AKIA" + uuid.uuid4().hex[:12].upper(),
        aws_secret_access_key="secret-" + uuid.uuid4().hex,
        region_name="eu-west-3",
    )
    name = _name("s3")
    block.save(name)
    return name, block


def test_s3_block_yields_s3fs_options():
    block = S3Credentials(
        endpoint_url="http://minio:9000", aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="pw-example", region_name="r"
    )
    assert block.storage_options() == {
        "key": "AKIDEXAMPLE",
        "secret": "pw-example",
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "r"},
    }
    assert "pw-example" not in repr(block) and "AKIDEXAMPLE" not in repr(block)
    assert S3Credentials().storage_options() == {}  # the machine's own credentials (instance role, env)
    assert S3Credentials(aws_session_token="t").storage_options() == {"token": "t"}


def test_a_config_names_the_block_and_resolves_to_its_options_in_memory(s3_block):
    name, block = s3_block
    config = BatchJobConfig(
        input="s3://bucket/in.jsonl",
        output="s3://bucket/out/",
        model={"source": "m"},
        storage_block=name,
        storage_options={"default_block_size": 1024, "client_kwargs": {"verify": False}},
    )
    resolved = with_storage_credentials(config)
    assert resolved.storage_options == {
        "key": block.aws_access_key_id.get_secret_value(),
        "secret": block.aws_secret_access_key.get_secret_value(),
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-3", "verify": False},
        "default_block_size": 1024,
    }
    assert resolved.storage_block is None and with_storage_credentials(resolved) is resolved  # loads nothing twice
    # The config the flow gets (its parameters) names the block only; the resolved copy hides its options.
    secret = block.aws_secret_access_key.get_secret_value()
    assert secret not in config.model_dump_json() and name in config.model_dump_json()
    assert secret not in repr(resolved) and block.aws_access_key_id.get_secret_value() not in repr(resolved)
    # rayllm_stages' jobs resolve through the installed resolver; the job holds the copy, the config stays as it was.
    job = BatchJob(config)
    assert (
        job.config.storage_options["secret"] == secret
        and job.output.storage_options["key"] == block.aws_access_key_id.get_secret_value()
    )
    assert config.storage_block == name and "secret" not in config.storage_options


def test_nested_blocks_resolve_where_they_are_named(s3_block):
    name, block = s3_block
    curation = CurationConfig(source={"url": "s3://images/", "storage_block": name}, output="/tmp/out", model={"source": "m"})
    assert curation.fetch.storage_block == name  # the fetch stage reads the source's objects: same credentials
    resolved = with_storage_credentials(curation)
    assert resolved.source.storage_options["key"] == block.aws_access_key_id.get_secret_value()
    assert resolved.fetch.storage_options["key"] == block.aws_access_key_id.get_secret_value()
    assert resolved.storage_options == {}  # the output named no block
    evaluation = EvaluationConfig.model_validate(
        {
            "name": "e",
            "dataset": {"path": "s3://b/eval.jsonl"},
            "output": "s3://b/evals",
            "targets": [{"name": "t", "model": {"source": "m"}}],
            "metrics": [{"type": "exact_match"}],
            "baseline": {"scores": "s3://old/scores.jsonl", "storage_block": name},
        }
    )
    assert (
        with_storage_credentials(evaluation).baseline.storage_options["secret"] == block.aws_secret_access_key.get_secret_value()
    )
    assert storage_options_with_block(name, {"anon": False})["anon"] is False
    assert storage_options_with_block(None, {"anon": True}) == {"anon": True}


def test_a_missing_block_is_one_message_naming_it(prefect_server):
    config = CurationConfig(source={"url": "s3://images/", "storage_block": "no-such-block"}, output="/o", model={"source": "m"})
    with pytest.raises(ConfigError) as caught:
        with_storage_credentials(config)
    assert str(caught.value).startswith("source.storage_block: no Prefect block rayllm-s3-credentials/no-such-block")


def test_without_the_prefect_layer_a_named_block_is_refused_not_ignored():
    config = BatchJobConfig(input="s3://b/in.jsonl", output="s3://b/o", model={"source": "m"}, storage_block="prod")
    set_credentials_resolver(None)
    try:
        with pytest.raises(ConfigError, match="storage_block: the storage block 'prod' is read through Prefect"):
            with_credentials(config)
        plain = config.model_copy(update={"storage_block": None})
        assert with_credentials(plain) is plain
    finally:
        set_credentials_resolver(with_storage_credentials)


def test_ray_address_and_ray_block_exclude_each_other():
    with pytest.raises(ValueError, match="give ray_address or ray_block, not both"):
        BatchJobConfig(input="i", output="o", model={"source": "m"}, ray_address="auto", ray_block="cluster")


def test_cli_batch_with_a_missing_block_exits_2_naming_it(tmp_path, prefect_server):
    (tmp_path / "in.jsonl").write_text("")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": "s3://bucket/in.jsonl",
                "output": "s3://bucket/out/",
                "model": {"source": "m"},
                "storage_block": "missing-creds",
            }
        )
    )
    outcome = CliRunner().invoke(app, ["batch", str(config), "--no-progress"])
    assert outcome.exit_code == 2, outcome.output
    assert "storage_block: no Prefect block rayllm-s3-credentials/missing-creds" in outcome.output
    assert "Traceback" not in outcome.output


def test_prefect_block_register_finds_the_collections_blocks(prefect_server):
    run = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "prefect"), "block", "register", "-m", "prefect_rayllm.tasks.blocks"],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "RayLLM S3 Credentials" in run.stdout and "RayLLM Ray Connection" in run.stdout, run.stdout
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="prefect.collections") if e.name == "prefect_rayllm"]
    blocks = entry.load().blocks  # what Prefect imports for the collection
    assert (blocks.S3Credentials, blocks.RayConnection) == (S3Credentials, RayConnection)


PROBE = """
import json, os, sys
import ray
from prefect import flow
from prefect_rayllm.tasks.runtime import connect_ray

@ray.remote
def probe():
    return os.environ.get("RAYLLM_BLOCK_PROBE")

@flow(name="ray-block-probe")
def run():
    connected = connect_ray(block=sys.argv[1])
    return {"address": connected["address"], "namespace": ray.get_runtime_context().namespace, "env": ray.get(probe.remote())}

print("RESULT " + json.dumps(run()))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_ray_through_a_ray_connection_block(ray_head, prefect_server):
    """A cluster named by a block: its address, namespace and runtime_env all reach Ray."""
    address, _ = ray_head
    name = _name("cluster")
    block = RayConnection(address=address, namespace="rayllm-block-test", runtime_env={"env_vars": {"RAYLLM_BLOCK_PROBE": "yes"}})
    block.save(name)
    run = subprocess.run(
        [sys.executable, "-c", PROBE, name],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert result["address"].endswith(":" + address.rsplit(":", 1)[1]), result
    assert (result["namespace"], result["env"]) == ("rayllm-block-test", "yes")


def test_validate_reads_the_input_through_the_block(tmp_path, prefect_server, local_s3):
    name = _name("validate")
    S3Credentials(endpoint_url=local_s3.endpoint_url, aws_access_key_id="AKIAVALIDATE", aws_secret_access_key="pw").save(name)
    bucket = local_s3.create_bucket("validate-block")
    line = json.dumps(
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]},
        }
    )
    with local_s3.filesystem().open(f"{bucket}/in.jsonl", "w") as handle:
        handle.write(line + "\n")
    config = tmp_path / "job.yaml"
    job = {
        "input": f"{bucket}/in.jsonl",
        "output": f"{bucket}/out/",
        "model": {"source": "m", "engine": "http", "base_url": "http://h/v1"},
    }
    config.write_text(yaml.safe_dump({**job, "storage_block": name}))
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 0, outcome.output
    assert "valid batch config;" in outcome.output and "input not checked" not in outcome.output
    config.write_text(yaml.safe_dump({**job, "storage_block": "not-there"}))
    outcome = CliRunner().invoke(app, ["validate", str(config)])
    assert outcome.exit_code == 2 and "storage_block: no Prefect block rayllm-s3-credentials/not-there" in outcome.output
