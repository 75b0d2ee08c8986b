"""Chain benchmark: a two-step chain pipelined (both steps at once) vs step 1 to completion, then step 2.

    .venv/bin/python bench/chain_bench.py [--rows 2000]

Both variants run the same two tiny local models (a trained "rewriter", then a trained "answerer")
over the same table through `prefect_rayllm.rayllm_stages.jobs.chain.ChainJob`, each variant in a fresh subprocess
that connects to its own local Ray once:
    pipelined    : one ChainJob with steps [reformat, answer] (one lazy Ray Data pipeline)
    materialised : a ChainJob with [reformat] writes results.jsonl; a second ChainJob with [answer]
                   reads that file (the hand-written glue most users start with)
It prints wall times (subprocess launch -> exit, engine starts included) and the ratio
pipelined / materialised (target <= 0.8), and writes bench/results/chain.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = REPO / ".venv" / "bin" / "python"

VARIANT = r"""
import json, sys, time
sys.path.insert(0, REPO)
from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob
from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig

def run(config):
    job = ChainJob(ChainJobConfig.model_validate(config))
    job.prepare(overwrite=True)
    execution = job.execute()
    return job.finalize(execution=execution)

if __name__ == "__main__":
    started = time.perf_counter()
    ray_runtime.connect()
    steps = json.loads(STEPS)
    base = {"input": INPUT, "id_column": "cid", "commit_every_rows": 500, "max_error_rate": 0.05}
    if VARIANT_NAME == "pipelined":
        manifests = [run({**base, "output": WORK + "/pipelined", "steps": steps})]
    else:
        first = run({**base, "output": WORK + "/step1", "steps": steps[:1]})
        manifests = [first, run({**base, "input": first.outputs["results"], "output": WORK + "/step2", "steps": steps[1:]})]
    print("BENCH_JSON " + json.dumps({"seconds": time.perf_counter() - started,
                                      "completed": manifests[-1].counts.completed,
                                      "failed": sum(m.counts.failed for m in manifests)}))
"""


def build_models(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    from prefect_rayllm.rayllm_stages.testing.tiny_models import REWRITE_TASK, build_tiny_chat_model

    rewriter, answerer = folder / "rewriter", folder / "answerer"
    if not (rewriter / "config.json").exists():
        build_tiny_chat_model(rewriter, trained=True, task=REWRITE_TASK)
    if not (answerer / "config.json").exists():
        build_tiny_chat_model(answerer, trained=True)
    return rewriter, answerer


def write_table(path: Path, rows: int) -> None:
    from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

    colours = [q.split()[1] for q, _ in TOY_TASK]
    path.write_text("\n".join(json.dumps({"cid": f"c{i}", "colour": colours[i % len(colours)]}) for i in range(rows)) + "\n")


def run_variant(name: str, work: Path, table: Path, steps: list[dict]) -> dict:
    script = work / f"{name}.py"
    script.write_text(
        f"REPO = {str(REPO)!r}\nINPUT = {str(table)!r}\nWORK = {str(work)!r}\n"
        f"STEPS = {json.dumps(json.dumps(steps))}\nVARIANT_NAME = {name!r}\n" + VARIANT
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYLLM_RAY_LOGS": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
    started = time.perf_counter()
    done = subprocess.run([str(PYTHON), str(script)], capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}); log: {work / (name + '.log')}")
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("BENCH_JSON "))[len("BENCH_JSON ") :])
    return {"variant": name, "wall_s": round(wall, 2), "in_process_s": round(report["seconds"], 2), **report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rewriter, answerer = build_models(RESULTS / "chain-models")
    model = lambda folder: {"source": str(folder), "engine_kwargs": {"max_model_len": 256}, "batch_size": 32}  # noqa: E731
    steps = [
        {
            "name": "reformat",
            "model": model(rewriter),
            "prompt": {"user": "Rewrite as a question: {{ colour }}"},
            "sampling": {"max_tokens": 16},
            "output_column": "question",
        },
        {
            "name": "answer",
            "model": model(answerer),
            "prompt": {"user": "{{ question }}"},
            "sampling": {"max_tokens": 8},
            "output_column": "answer",
        },
    ]
    with tempfile.TemporaryDirectory(prefix="chain-bench-") as tmp:
        work = Path(tmp)
        table = work / "colours.jsonl"
        write_table(table, args.rows)
        results = [run_variant(name, work, table, steps) for name in ("pipelined", "materialised")]
    ratio = round(results[0]["wall_s"] / results[1]["wall_s"], 3)
    lines = [
        f"# Chain benchmark: {args.rows} rows, two tiny models, CPU vLLM ({os.cpu_count()} cores)",
        "",
        "| variant | rows completed | wall s (incl. engine starts) | in-process s |",
        "| --- | --- | --- | --- |",
        *[f"| {r['variant']} | {r['completed']} | {r['wall_s']} | {r['in_process_s']} |" for r in results],
        "",
        f"pipelined / materialised = **{ratio}** (target <= 0.8)",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    (RESULTS / "chain.md").write_text(markdown + "\n")
    (RESULTS / "chain.json").write_text(json.dumps({"rows": args.rows, "results": results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
