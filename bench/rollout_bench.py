"""Zero-downtime rollout bench: a bounded client load runs through a whole rollout on loopback.

Builds the tiny models, deploys the trained one as the endpoint's first version, then (with the
load running) rolls out the untrained twin, which the evaluation gate rejects, and a copy of the
trained one, which goes through the canary steps and is promoted. Prints, per phase and per
rollout step: requests served, failures, p50/p99 latency and the candidate's share of answers.

    .venv/bin/python bench/rollout_bench.py --concurrency 2 --hold 15 [--out bench/results/rollout.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("RAYLLM_RAY_LOGS", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPT = "Is red warm or cool?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _row(label: str, samples, candidate: str | None) -> str:
    from prefect_rayllm.rayllm_stages.testing.client_load import summarize

    s = summarize(samples)
    share = (
        "-"
        if not candidate or not s["requests"]
        else f"{sum(x.version == candidate for x in samples if x.ok) / max(1, s['requests'] - s['failures']):.0%}"
    )
    p50 = "-" if s["p50_s"] is None else f"{s['p50_s'] * 1000:.0f}"
    p99 = "-" if s["p99_s"] is None else f"{s['p99_s'] * 1000:.0f}"
    return f"| {label} | {s['requests']} | {s['failures']} | {p50} | {p99} | {share} |"


def _phase_rows(name: str, report, samples) -> list[str]:
    start, end = report.steps[0].started, report.steps[-1].finished
    rows = [
        _row(f"**{name}** (whole rollout, {end - start:.0f} s)", [x for x in samples if start <= x.start <= end], report.version)
    ]
    for step in report.steps:
        inside = [x for x in samples if x.start >= step.started and x.end <= step.finished]
        rows.append(
            _row(
                f"{name}: {step.step} ({step.finished - step.started:.0f} s, {'passed' if step.passed else 'FAILED'})",
                inside,
                report.version,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=2, help="client threads")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds per canary step")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()

    from ray import serve

    from prefect_rayllm.flows.rollout import rollout_endpoint
    from prefect_rayllm.rayllm_stages.rollout import endpoints
    from prefect_rayllm.rayllm_stages.rollout.config import RolloutConfig
    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
    from prefect_rayllm.rayllm_stages.testing.client_load import ClientLoad
    from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK, build_tiny_chat_model
    from prefect_rayllm.tasks.endpoints import RolloutRolledBack

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    good = build_tiny_chat_model(work / "tiny-good", trained=True)
    bad = build_tiny_chat_model(work / "tiny-bad", trained=False)
    good_v2 = shutil.copytree(good, work / "tiny-good-v2", dirs_exist_ok=True)
    dataset = work / "eval.jsonl"
    dataset.write_text(
        "".join(json.dumps({"qid": f"q{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(TOY_TASK))
    )
    ray_runtime.connect()
    port = _free_port()

    def config(source: Path, **extra) -> RolloutConfig:
        return RolloutConfig.model_validate(
            {
                "endpoint": "bench",
                "model_id": "colours",
                "candidate": {"source": str(source), "engine_kwargs": {"max_model_len": 256}},
                "http": {"port": port},
                "smoke": [{"prompt": PROMPT}],
                "timeouts": {"deploy_s": 900},
                "canary": [{"percent": p, "hold_s": args.hold, "probe_requests": 2} for p in (10, 50, 100)],
                **extra,
            }
        )

    t0 = time.time()
    first = rollout_endpoint(config=config(good))
    print(f"first version {first.version} serving after {time.time() - t0:.0f} s", flush=True)
    gate = {
        "name": "bench-rollout",
        "output": str(work / "evals"),
        "dataset": {
            "path": str(dataset),
            "id_field": "qid",
            "input_field": "question",
            "reference_field": "answer",
            "tags_field": None,
        },
        "prompt": {"user": "{{ question }}"},
        "sampling": {"max_tokens": 8},
        "metrics": [{"type": "exact_match"}],
        "gate": {"min": {"exact_match": 0.8}},
    }
    load = ClientLoad(config(good).stable_url, "colours", PROMPT, concurrency=args.concurrency, max_tokens=4)
    load.start()
    try:
        time.sleep(3)
        try:
            rollout_endpoint(config=config(bad, evaluation=gate))
            raise SystemExit("the untrained candidate was promoted: the gate did not hold")
        except RolloutRolledBack as exc:
            rejected = exc.report
        promoted = rollout_endpoint(config=config(good_v2, evaluation=gate))
        time.sleep(3)
    finally:
        samples = load.stop()
        endpoints.teardown("bench")
        serve.shutdown()
        ray_runtime.shutdown()

    lines = [
        f"Rollout bench: {args.concurrency} client threads, canary holds {args.hold:.0f} s, tiny models on CPU vLLM.",
        "",
        "| phase / step | requests | failures | p50 (ms) | p99 (ms) | candidate share |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("**all** (both rollouts)", samples, None),
        *_phase_rows("rolled back (untrained)", rejected, samples),
        *_phase_rows("promoted (trained copy)", promoted, samples),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
