"""The root of `rayllm`: commands grouped in --help, --version, and one error path for every command
(a config error: one message on stderr and exit 2, never a traceback; anything else: exit 1)."""

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prefect_rayllm.flows.cli import app

PANELS = {
    "Jobs": ["batch", "chain", "evaluate", "curate", "rollout"],
    "Endpoints": ["endpoint"],
    "Deployments": ["deploy", "serve", "api"],
    "Local tools": ["validate", "demo", "make-tiny-model", "make-image-corpus"],
}


def _panels(help_text: str) -> dict[str, list[str]]:
    """Panel title -> the commands listed in it, read from the rendered help."""
    panels: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        title = re.match(r"╭─ (.+?) ─", line)
        if title:
            current = title.group(1)
            panels[current] = []
            continue
        command = re.match(r"│ ([a-z][a-z-]+) ", line)
        if current and command:
            panels[current].append(command.group(1))
    return panels


def test_help_groups_the_commands_by_what_they_are_for() -> None:
    outcome = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert outcome.exit_code == 0
    panels = _panels(outcome.output)
    assert {title: commands for title, commands in panels.items() if title != "Options"} == PANELS
    assert list(panels)[1:] == list(PANELS)  # after the options, in this order
    for commands in PANELS.values():
        for command in commands:
            assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0, command


def test_version_through_the_module_entry_point() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"prefect-rayllm {version('prefect-rayllm')}")


def test_a_config_error_is_one_message_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("input: in.jsonl\noutput: out/\nmodel: {source: m, engin: vllm}\n")
    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "batch", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {config} is invalid:\n  line 3: model.engin: unknown key (did you mean 'engine'?)\n"
    assert done.stdout == ""


def test_an_unexpected_failure_is_exit_1_with_its_type_and_no_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outcome = CliRunner().invoke(app, ["make-image-corpus", str(blocker / "corpus")])
    assert outcome.exit_code == 1
    assert outcome.output.startswith("make-image-corpus failed: NotADirectoryError:")
    assert "Traceback" not in outcome.output


def test_an_expected_failure_of_a_subcommand_goes_the_same_way(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "m"), "--task", "poems"])
    assert outcome.exit_code == 2 and "--task" in outcome.output and "must be one of colours, rewrite" in outcome.output
    outcome = CliRunner().invoke(app, ["endpoint", "scale", str(tmp_path / "missing.yaml"), "--min", "1", "--max", "2"])
    assert outcome.exit_code == 2 and "does not exist" in outcome.output
