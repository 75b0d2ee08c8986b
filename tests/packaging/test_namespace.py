"""The installed package is one namespace, `prefect_rayllm`, beside a user's own `flows/` and `tasks/`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


def test_user_project_with_its_own_flows_and_tasks_imports_both(tmp_path: Path) -> None:
    for package in ("flows", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "mine.py").write_text(f"WHO = 'user {package}'\n")
    script = (
        "import flows.mine, tasks.mine\n"
        "from prefect_rayllm.flows.batch import batch_inference\n"
        "from prefect_rayllm.tasks.batch import run_batch\n"
        "print(flows.mine.WHO, '|', tasks.mine.WHO, '|', batch_inference.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "user flows | user tasks | batch-inference"


def test_runtime_layer_never_imports_prefect() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "rayllm_stages").rglob("*.py")
        if any(
            line.lstrip().startswith(("import prefect", "from prefect ", "from prefect."))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []


def test_version_and_collection_entry_point() -> None:
    from importlib.metadata import entry_points, version

    done = subprocess.run(
        [sys.executable, "-m", "prefect_rayllm.flows.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == f"prefect-rayllm {version('prefect-rayllm')}"
    [entry] = [e for e in entry_points(group="prefect.collections") if e.name == "prefect_rayllm"]
    assert entry.load().__name__ == "prefect_rayllm.tasks"


@pytest.mark.slow
def test_wheel_has_one_top_level_namespace(built_wheel: Path) -> None:
    wheel = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"prefect_rayllm"}
    assert "prefect_rayllm/deployments/prefect.yaml" in names
    # the CLI package, with its module entry point (`python -m prefect_rayllm.flows.cli`)
    assert {f"prefect_rayllm/flows/cli/{m}.py" for m in ("__init__", "__main__", "app", "jobs", "tools")} <= set(names)
    assert not any("/testing/" in name and name.endswith("conftest.py") for name in names)


def test_test_files_have_unique_basenames() -> None:
    """The test folders are not packages (pytest's default import mode): two test files with one
    basename stop the whole collection with 'import file mismatch'."""
    names = [path.name for path in (REPO / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
