"""Every job command refuses a bad config or input before it starts anything: no Ray, no Prefect
server, not even their imports; the message names the path, in well under 3 seconds."""

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

LIMIT_S = 3.0


def _configs(root: Path) -> dict[str, tuple[dict, str]]:
    """command -> (a config whose input is missing, the key and path the error must name)."""
    gone = root / "nowhere"
    evaluation = {
        "name": "e",
        "dataset": {"path": str(gone / "eval.jsonl")},
        "output": str(root / "evals"),
        "metrics": [{"type": "exact_match"}],
    }
    return {
        "batch": (
            {"input": str(gone / "requests.jsonl"), "output": str(root / "out"), "model": {"source": "m"}},
            f"input: {gone}/requests.jsonl",
        ),
        "chain": (
            {
                "input": str(gone / "table.jsonl"),
                "output": str(root / "out"),
                "steps": [{"name": "a", "model": {"source": "m"}, "prompt": {"user": "{{ q }}"}, "output_column": "y"}],
            },
            f"input: {gone}/table.jsonl",
        ),
        "evaluate": ({**evaluation, "targets": [{"name": "t", "model": {"source": "m"}}]}, f"dataset.path: {gone}/eval.jsonl"),
        "curate": (
            {"source": {"url": str(gone / "images")}, "output": str(root / "out"), "model": {"source": "m"}},
            f"source.url: {gone}/images",
        ),
        "rollout": (
            {
                "endpoint": "colours",
                "model_id": "colours",
                "candidate": {"source": "m"},
                "smoke": [{"prompt": "hi"}],
                "evaluation": evaluation,
            },
            f"evaluation.dataset.path: {gone}/eval.jsonl",
        ),
    }


@pytest.mark.parametrize("command", ["batch", "chain", "evaluate", "curate", "rollout"])
def test_a_missing_input_fails_fast_before_any_runtime(tmp_path: Path, command: str) -> None:
    data, named = _configs(tmp_path)[command]
    config = tmp_path / f"{command}.yaml"
    config.write_text(json.dumps(data))
    # The bar is the command's own CPU time: wall time on a loaded 2-core machine measures the load.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prefect_rayllm.flows.cli", command, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    imported = {m.group(1) for m in re.finditer(r"^import time:.*\| +([\w.]+)$", done.stderr, re.M)}
    message = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert message == [f"error: {named} does not exist"]
    assert elapsed < LIMIT_S, f"{command}: {elapsed:.2f} s of CPU"
    assert not {m for m in imported if m.split(".")[0] in ("ray", "prefect", "vllm", "torch")}, "a runtime was imported"
    assert not (tmp_path / "out").exists() and not (tmp_path / "evals").exists()


def test_a_bad_key_in_a_job_config_names_its_line(tmp_path: Path) -> None:
    config = tmp_path / "curate.yaml"
    config.write_text("source: {url: ./images}\noutput: out/\nmodel: {source: m}\nfilter: {min_widht: 64}\n")
    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "curate", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {config} is invalid:\n  line 4: filter.min_widht: unknown key (did you mean 'min_width'?)\n"


def test_the_judge_rubric_may_use_reference_from_the_cli(tmp_path: Path) -> None:
    """Before: exit 2 after an 87-line Prefect traceback; now the config and dataset pass the checks."""
    dataset = tmp_path / "eval.jsonl"
    dataset.write_text(json.dumps({"qid": "q1", "question": "Is red warm or cool?", "answer": "warm"}) + "\n")
    http = {"engine": "http", "base_url": "http://127.0.0.1:9/v1"}
    config = tmp_path / "eval.yaml"
    config.write_text(
        json.dumps(
            {
                "name": "judged",
                "dataset": {"path": str(dataset), "id_field": "qid", "input_field": "question", "reference_field": "answer"},
                "output": str(tmp_path / "out"),
                "targets": [{"name": "t", "model": {"source": "m", **http}}],
                "prompt": {"user": "{{ question }}"},
                "metrics": [{"type": "judge"}],
                "judge": {
                    "model": {"source": "j", **http},
                    "rubric": {"user": "Expected {{ reference }}, got {{ prediction }}."},
                },
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "validate", str(config)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"ok: {config} is a valid evaluation config; {dataset}: 1 examples; targets: t\n",
    )


def test_an_output_with_another_runs_settings_is_one_message_not_a_traceback(tmp_path: Path) -> None:
    from conftest import openai_line

    from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
    from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob

    requests = tmp_path / "requests.jsonl"
    requests.write_text(openai_line("a", "Is red warm or cool?") + "\n")
    data = {"input": str(requests), "output": str(tmp_path / "out"), "model": {"source": "m"}, "sampling": {"max_tokens": 8}}
    BatchJob(BatchJobConfig.model_validate(data)).prepare()  # an earlier run's record (no engine needed)
    config = tmp_path / "batch.yaml"
    config.write_text(json.dumps({**data, "sampling": {"max_tokens": 16}}))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and time.monotonic() - started < LIMIT_S
    assert done.stderr.startswith(f"error: output {tmp_path}/out holds a batch run with other settings (")
    assert done.stderr.endswith("rerun with overwrite (--overwrite) to start over, or choose another output\n")
    assert len(done.stderr.splitlines()) == 1
