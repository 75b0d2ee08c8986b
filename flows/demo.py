"""`rayllm demo`: a batch run, an evaluation and an image curation end to end on this machine, with nothing but the package installed.

The flows run in this process through `prefect_rayllm.flows.local` (as the CLI's job commands do);
this module does not import the CLI, and the CLI imports it only when `rayllm demo` runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rich.console import Console

from prefect_rayllm.flows.local import run_with_progress
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.rayllm_stages.testing.local_s3 import start_local_s3
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK, build_tiny_chat_model

BUCKET = "rayllm-demo"


def sample_batch_lines(rows: int, seed: int = 0) -> list[str]:
    """OpenAI Batch requests over the toy task, plus two malformed lines to show the error file."""
    rng = random.Random(seed)
    lines = []
    for number in range(rows):
        question, _ = rng.choice(TOY_TASK)
        lines.append(
            json.dumps(
                {
                    "custom_id": f"request-{number}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": question}], "max_tokens": 8},
                }
            )
        )
    lines.append('{"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions", "body": ')
    lines.append(
        json.dumps(
            {
                "custom_id": "request-0",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "duplicate id"}]},
            }
        )
    )
    return lines


def run_demo(workdir: Path, rows: int, console: Console) -> None:
    from prefect_rayllm.flows.batch import batch_inference

    workdir = workdir.resolve()
    model_dir = workdir / "models" / "tiny-chat"
    if not (model_dir / "config.json").exists():
        console.print(f"building a tiny trained chat model in {model_dir} …")
        build_tiny_chat_model(model_dir, trained=True)
    s3 = start_local_s3()
    try:
        console.print(f"local S3 server on {s3.endpoint_url}")
        fs = s3.filesystem()
        s3.create_bucket(BUCKET)
        with fs.open(f"{BUCKET}/requests.jsonl", "w") as handle:
            handle.write("\n".join(sample_batch_lines(rows)) + "\n")
        config = BatchJobConfig(
            input=f"s3://{BUCKET}/requests.jsonl",
            output=f"s3://{BUCKET}/run-1/",
            model={"source": str(model_dir), "id": "tiny-chat", "engine_kwargs": {"max_model_len": 256}},
            sampling={"temperature": 0.0, "max_tokens": 8},
            max_error_rate=0.5,  # the sample has two deliberately broken lines
            storage_options=s3.storage_options,
        )
        manifest = run_with_progress(batch_inference, "batch", config, True, console)
        local_copy = workdir / "run-1"
        local_copy.mkdir(parents=True, exist_ok=True)
        for name in ("results.jsonl", "errors.jsonl", "manifest.json"):
            fs.get(f"{BUCKET}/run-1/{name}", str(local_copy / name))
        _print_summary(console, manifest, local_copy)
        evaluation = _run_evaluation(s3, model_dir, console)
        (local_copy.parent / "eval-1").mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "report.md"):
            fs.get(f"{BUCKET}/eval-1/{name}", str(local_copy.parent / "eval-1" / name))
        curation = _run_curation(s3, workdir, console)
        (workdir / "curation-1").mkdir(parents=True, exist_ok=True)
        for name in ("curated.parquet", "rejected.parquet", "manifest.json"):
            fs.get(f"{BUCKET}/curation-1/{name}", str(workdir / "curation-1" / name))
    finally:
        s3.stop()
    summary = evaluation.summaries["tiny-chat"].metrics["exact_match"]
    console.print(
        f"\n[bold]evaluation: gate {'passed' if evaluation.passed else 'FAILED'}[/]; exact match "
        f"{summary.mean:.2f} (95% interval {summary.ci_low:.2f}-{summary.ci_high:.2f}); "
        f"report copied to {local_copy.parent / 'eval-1' / 'report.md'}"
    )
    console.print(
        f"[bold]image curation:[/] {curation.counts.completed} of {curation.counts.total} images kept; rejected by stage: "
        f"{curation.counts.errors_by_code}; datasets copied to {workdir / 'curation-1'}"
    )
    console.print(
        "the flow runs' reports and summaries are artifacts in the Prefect UI (`rayllm demo --ui` keeps a local "
        "server with them running after the demo)"
    )


def _run_curation(s3, workdir: Path, console: Console) -> Manifest:
    """A small image corpus (good, broken and duplicate images) curated with a tiny VLM."""
    from prefect_rayllm.flows.curation import curate_images
    from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
    from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus
    from prefect_rayllm.rayllm_stages.testing.tiny_vision import build_tiny_vision_model

    vlm_dir = workdir / "models" / "tiny-vlm"
    if not (vlm_dir / "config.json").exists():
        build_tiny_vision_model(vlm_dir)
    corpus = build_corpus(f"s3://{BUCKET}/images-corpus", s3.storage_options)
    config = CurationConfig(
        source={"manifest": corpus.manifest_url, "storage_options": s3.storage_options},
        output=f"s3://{BUCKET}/curation-1/",
        model={"source": str(vlm_dir), "engine_kwargs": {"max_model_len": 512, "dtype": "float32"}, "batch_size": 8},
        filter={"min_width": 32, "min_height": 32},
        storage_options=s3.storage_options,
    )
    return run_with_progress(curate_images, "curate", config, False, console)


def _run_evaluation(s3, model_dir: Path, console: Console):
    """The same model on the toy task's evaluation set, with a gate it should pass."""
    from prefect_rayllm.flows.evaluation import evaluate
    from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig

    fs = s3.filesystem()
    with fs.open(f"{BUCKET}/eval.jsonl", "w") as handle:
        for number, (question, answer) in enumerate(TOY_TASK * 2):
            handle.write(json.dumps({"qid": f"q{number}", "question": question, "answer": answer, "tags": [answer]}) + "\n")
    config = EvaluationConfig(
        name="demo-colours",
        dataset={"path": f"s3://{BUCKET}/eval.jsonl", "id_field": "qid", "input_field": "question", "reference_field": "answer"},
        output=f"s3://{BUCKET}/eval-1/",
        targets=[{"name": "tiny-chat", "model": {"source": str(model_dir), "engine_kwargs": {"max_model_len": 256}}}],
        prompt={"user": "{{ question }}"},
        sampling={"temperature": 0.0, "max_tokens": 8},
        metrics=[{"type": "exact_match"}, {"type": "latency"}],
        gate={"min": {"exact_match": 0.8}},
        storage_options=s3.storage_options,
    )
    return run_with_progress(evaluate, "evaluate", config, True, console)


def _print_summary(console: Console, manifest, local_copy: Path) -> None:
    counts = manifest.counts
    console.print(
        f"\n[bold]{counts.completed} completed, {counts.failed} failed[/] of {counts.total} requests "
        f"({manifest.throughput.rows_per_s} rows/s over {manifest.timings.wall_s} s)"
    )
    with open(local_copy / "results.jsonl") as handle:
        for line in list(handle)[:3]:
            record = json.loads(line)
            answer = record["response"]["body"]["choices"][0]["message"]["content"]
            console.print(f"  {record['custom_id']}: {answer!r}")
    console.print(f"results (S3): {manifest.outputs['results']}")
    console.print(f"outputs copied to {local_copy}: results.jsonl, errors.jsonl, manifest.json")
