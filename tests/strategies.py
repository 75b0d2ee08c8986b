"""Hypothesis strategies for whole inputs: OpenAI Batch files, tables and chain tables, each line
or row generated together with what the pipeline must make of it (answered, or which error code).

Valid prompts stay far below the test model's context (256 tokens): at most four messages of
at most 10 characters (a byte-level BPE spends at most 4 tokens a character) or one toy
question, with max_tokens <= 16. Over-long prompts are far above it (300+ words), so the
expectation never depends on counting tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from prefect_rayllm.rayllm_stages.testing.tiny_models import TOY_TASK

CONTEXT = 256
DEFAULT_MAX_TOKENS = 8
QUESTIONS = [q for q, _ in TOY_TASK]
# Text a user might send: any character but surrogates (not encodable) and line breaks, which
# JSON escapes anyway; plus the awkward ones on purpose.
AWKWARD = [
    "\t",
    "\n",
    "\r\n",
    "🙂",
    "🌈🔥",
    "naïve café",
    "日本語",
    "\u200b",
    "\u2028",
    "\x00",
    '"',
    "\\",
    "{{ x }}",
    "</s>",
    "<|user|>",
]
short_text = st.one_of(
    st.sampled_from(QUESTIONS),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10),
    st.sampled_from(AWKWARD),
)
long_text = st.integers(300, 700).map(lambda n: "word " * n)
ids = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)


@dataclass
class Line:
    """One generated input line and what must become of it."""

    text: str
    code: str | None = None  # None: answered
    custom_id: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass
class InputFile:
    lines: list[Line] = field(default_factory=list)
    block_rows: int = 4

    def write(self, path) -> None:
        path.write_text("".join(line.text + "\n" for line in self.lines), encoding="utf-8")


def _content(text: str, list_form: bool) -> Any:
    """String content, or OpenAI list-form content (text parts) saying the same."""
    if not list_form:
        return text
    half = len(text) // 2
    return (
        [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]
        if half
        else [{"type": "text", "text": text}]
    )


@st.composite
def messages(draw, long: bool = False) -> list[dict[str, Any]]:
    """system?, then user/assistant turns ending with a user turn; string or list-form content."""
    turns = draw(st.integers(0, 1)) * 2 + 1  # user, or user/assistant/user
    result = []
    if draw(st.booleans()):
        result.append({"role": "system", "content": _content(draw(short_text), draw(st.booleans()))})
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        result.append({"role": role, "content": _content(draw(short_text), draw(st.booleans()))})
    if long:
        result[-1] = {"role": "user", "content": _content(draw(long_text), draw(st.booleans()))}
    return result


@st.composite
def sampling_fields(draw) -> tuple[dict[str, Any], int]:
    """Per-row sampling fields of a valid request (any subset) and the max_tokens that applies."""
    body: dict[str, Any] = {}
    options = {
        "max_tokens": st.integers(1, 16),
        "max_completion_tokens": st.integers(1, 16),
        "temperature": st.one_of(st.sampled_from([0, 1, 2]), st.floats(0, 2)),
        "top_p": st.floats(0, 1, exclude_min=True),
        "top_k": st.one_of(st.just(-1), st.integers(1, 100)),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.one_of(short_text.filter(bool), st.lists(short_text.filter(bool), min_size=1, max_size=4)),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2),
        "min_tokens": st.integers(0, 4),
    }
    for name in draw(st.sets(st.sampled_from(sorted(options)))):
        body[name] = draw(options[name])
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    return body, max_tokens


def request_line(custom_id: str, body: dict[str, Any], **extra: Any) -> str:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}, ensure_ascii=False
    )


@st.composite
def valid_request(draw, custom_id: str) -> Line:
    fields, max_tokens = draw(sampling_fields())
    body = {"model": draw(st.sampled_from(["tiny", "gpt-4o-mini", "some/other-model"])), "messages": draw(messages()), **fields}
    code = "invalid_sampling" if body.get("min_tokens", 0) > max_tokens else None
    return Line(request_line(custom_id, body), code, custom_id, max_tokens)


@st.composite
def too_long_request(draw, custom_id: str) -> Line:
    fields, max_tokens = draw(sampling_fields())
    code = "invalid_sampling" if fields.get("min_tokens", 0) > max_tokens else "prompt_too_long"
    return Line(request_line(custom_id, {"messages": draw(messages(long=True)), **fields}), code, custom_id, max_tokens)


@st.composite
def malformed_line(draw, custom_id: str) -> Line:
    """A line the reader refuses, with its code."""
    user = [{"role": "user", "content": "Is red warm or cool?"}]
    garbage = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=20)
    kind = draw(
        st.sampled_from(
            [
                "invalid_json",
                "invalid_request",
                "missing_custom_id",
                "unsupported_method",
                "unsupported_url",
                "invalid_body",
                "empty_messages",
                "invalid_message",
                "unsupported_content",
                "invalid_sampling",
                "unsupported_field",
            ]
        )
    )
    if kind == "invalid_json":
        text = "{" + draw(garbage)
        return Line(text.replace("\n", " "), kind)
    if kind == "invalid_request":
        return Line(json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5)))), kind)
    if kind == "missing_custom_id":
        cid = draw(st.sampled_from([None, "", 7, ["x"]]))
        record = {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": user}}
        if cid is not None:
            record["custom_id"] = cid
        return Line(json.dumps(record), kind)
    if kind == "unsupported_method":
        return Line(request_line(custom_id, {"messages": user}, method="GET"), kind, custom_id)
    if kind == "unsupported_url":
        return Line(request_line(custom_id, {"messages": user}, url="/v1/embeddings"), kind, custom_id)
    if kind == "invalid_body":
        return Line(
            json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": "text"}), kind, custom_id
        )
    if kind == "empty_messages":
        return Line(request_line(custom_id, {"messages": draw(st.sampled_from([[], None, "hi"]))}), kind, custom_id)
    if kind == "invalid_message":
        bad = draw(
            st.sampled_from(
                [
                    [{"role": "robot", "content": "x"}],
                    [{"role": "user"}],
                    [{"role": "user", "content": None}],
                    [{"role": "user", "content": []}],
                    ["just a string"],
                    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                ]
            )
        )
        return Line(request_line(custom_id, {"messages": bad}), kind, custom_id)
    if kind == "unsupported_content":
        part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        return Line(request_line(custom_id, {"messages": [{"role": "user", "content": [part]}]}), kind, custom_id)
    if kind == "invalid_sampling":
        name, value = draw(
            st.sampled_from(
                [
                    ("temperature", 2.5),
                    ("temperature", -1),
                    ("top_p", 0),
                    ("top_p", 1.5),
                    ("max_tokens", 0),
                    ("max_completion_tokens", -3),
                    ("presence_penalty", 3),
                    ("top_k", -5),
                    ("temperature", "hot"),
                    ("stop", 5),
                ]
            )
        )
        return Line(request_line(custom_id, {"messages": user, name: value}), kind, custom_id)
    field_name, value = draw(
        st.sampled_from([("stream", True), ("n", 2), ("tools", []), ("logprobs", True), ("response_format", {})])
    )
    return Line(request_line(custom_id, {"messages": user, field_name: value}), "unsupported_field", custom_id)


@st.composite
def openai_batch_files(draw, max_lines: int = 12) -> InputFile:
    """A whole OpenAI Batch file: valid requests with per-row fields, over-long prompts, malformed
    lines and repeated custom_ids anywhere, and a small block size so blocks mix them."""
    count = draw(st.integers(1, max_lines))
    kinds = draw(
        st.lists(st.sampled_from(["valid", "valid", "valid", "long", "malformed", "duplicate"]), min_size=count, max_size=count)
    )
    lines: list[Line] = []
    used: list[str] = []
    for position, kind in enumerate(kinds):
        custom_id = f"r{position}-" + draw(ids)
        if kind == "duplicate" and used:
            line = draw(valid_request(draw(st.sampled_from(used))))
            line.code = "duplicate_custom_id"
        elif kind == "long":
            line = draw(too_long_request(custom_id))
        elif kind == "malformed":
            line = draw(malformed_line(custom_id))
        else:
            line = draw(valid_request(custom_id))
        if line.custom_id is not None and line.code != "duplicate_custom_id":
            if line.custom_id in used:  # a generated id may repeat an earlier one by chance
                line.code = "duplicate_custom_id"
            else:
                used.append(line.custom_id)
        lines.append(line)
    return InputFile(lines, block_rows=draw(st.integers(1, 4)))
