"""Issue 11's file, as a new user wrote it: valid requests with per-row sampling fields and
malformed lines in the same blocks, through the real CPU vLLM engine. Every valid request is
answered whatever its neighbours, and the over-long prompt is reported as `prompt_too_long`."""

from __future__ import annotations

import json
import random

import pytest

from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob
from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

CONTEXT = 256
DECORATIONS = ["", " 🙂", "\twith a tab", "\nand a newline", " — naïve café ✓", " 日本語の質問", " 🌈🔥\t\n"]


def _valid_line(rng: random.Random, custom_id: str) -> str:
    question = TOY_TASK[rng.randrange(len(TOY_TASK))][0] + rng.choice(DECORATIONS)
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "Answer with one word." + rng.choice(DECORATIONS)})
    messages.append({"role": "user", "content": question})
    body: dict = {"model": rng.choice(["tiny", "gpt-4o-mini", "some/foreign-model"]), "messages": messages}
    length = rng.randint(1, 12)
    if rng.random() < 0.3:
        body["max_completion_tokens"] = length
    elif rng.random() < 0.8:
        body["max_tokens"] = length
    if rng.random() < 0.4:
        body["temperature"] = rng.choice([0, 0.0, 0.7, 1, 1.3])
    if rng.random() < 0.3:
        body["top_k"] = rng.randint(1, 40)
    if rng.random() < 0.2:
        body["top_p"] = rng.choice([0.5, 0.9, 1])
    if rng.random() < 0.2:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.1:
        body["stop"] = rng.choice(["\n", ["END", "."]])
    if rng.random() < 0.1:
        body["presence_penalty"] = rng.choice([0.5, -1, 0])
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}, ensure_ascii=False)


MALFORMED = [
    ("not json at all {", "invalid_json"),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}), "missing_custom_id"),
    (json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/completions", "body": {}}), "unsupported_url"),
    (
        json.dumps({"custom_id": "no-msg", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),
        "empty_messages",
    ),
    (
        json.dumps(
            {
                "custom_id": "hot",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "x"}], "temperature": 7},
            }
        ),
        "invalid_sampling",
    ),
    ("[1, 2, 3]", "invalid_request"),
    (
        json.dumps(
            {
                "custom_id": "robot",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "robot", "content": "x"}]},
            }
        ),
        "invalid_message",
    ),
    (
        json.dumps(
            {
                "custom_id": "stream",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "x"}], "stream": True},
            }
        ),
        "unsupported_field",
    ),
    (json.dumps({"custom_id": "q3", "method": "POST", "url": "/v1/chat/completions", "body": {}}), "duplicate_custom_id"),
]


def issue_file(seed: int = 11) -> tuple[list[str], dict[int, str]]:
    """162 lines: 152 valid requests with varied fields, 9 malformed lines and one prompt longer
    than the context (line 37), spread so that each sits in a block of valid rows. Returns the
    lines and, per bad line number, its expected error code."""
    rng = random.Random(seed)
    entries: list[tuple[str, str | None]] = [(_valid_line(rng, f"q{i}"), None) for i in range(152)]
    # Insert from the back so that earlier positions stay put.
    for slot, bad in zip(sorted(rng.sample(range(40, 152), len(MALFORMED)), reverse=True), MALFORMED, strict=True):
        entries.insert(slot, bad)
    too_long = json.loads(_valid_line(rng, "too-long"))
    too_long["body"].update(messages=[{"role": "user", "content": "word " * 600}], top_k=5, max_tokens=4)
    entries.insert(36, (json.dumps(too_long), "prompt_too_long"))
    lines = [line for line, _ in entries]
    expected = {number: code for number, (_, code) in enumerate(entries, start=1) if code is not None}
    return lines, expected


def test_issue_file_shape():
    lines, expected = issue_file()
    assert len(lines) == 162 and len(expected) == 10
    assert expected[37] == "prompt_too_long"


@pytest.mark.slow
def test_every_valid_request_answered_whatever_its_block_holds(tmp_path, ray_session, tiny_models):
    lines, expected = issue_file()
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = BatchJobConfig(
        input=str(source),
        output=str(tmp_path / "out"),
        model={
            "source": str(tiny_models["good"]),
            "id": "tiny-good",
            "engine_kwargs": {"max_model_len": CONTEXT},
            "batch_size": 16,
        },
        sampling={"max_tokens": 8},
        max_error_rate=0.2,
    )
    job = BatchJob(config)
    job.prepare()
    job.execute()
    manifest = job.finalize()

    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(results) + len(errors) == len(lines)
    unexpected = [e for e in errors if e["error"]["line"] not in expected]
    assert not unexpected, unexpected[:3]
    assert len(results) == 152 and manifest.counts.completed == 152
    for record in results:
        body = record["response"]["body"]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    assert {e["error"]["line"]: e["error"]["code"] for e in errors} == expected
    (too_long,) = [e for e in errors if e["custom_id"] == "too-long"]
    assert too_long["error"]["message"].startswith("line 37 (too-long): ")
    assert f"maximum context length is {CONTEXT} tokens" in too_long["error"]["message"]
