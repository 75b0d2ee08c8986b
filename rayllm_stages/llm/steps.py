"""What one LLM step asks and keeps: the request it builds from a row, and what it writes back.

Every step has the shape of `LLMStep`: a name, whether its requests carry images, the JSON schema
its replies follow (or None), its sampling, the placeholder request a failed row sends instead of
its own (one token, the shape of the step's requests), and two methods over rows of the row
contract (`rows.ROW_SCHEMA`):

    request(row) -> ChatRequest(messages, sampling)   or raises StepFailed (the row fails here)
    record(row, reply text) -> the row's new row_json   or raises StepFailed

A step object is handed to the `ray.data.llm` processor's preprocess and postprocess (it is pickled
to the Ray workers, so it holds plain data only). It never sees a failed row: the engine sends the
placeholder for it and passes its error on untouched (see `engines`).

Example (a chain step over a table row):
    row_json '{"cid": "c1", "colour": "red"}'
    --request--> [{"role": "user", "content": "Is red warm or cool?"}], EngineSampling(max_tokens=8)
    --record("warm")--> row_json '{"cid": "c1", "colour": "red", "answer": "warm"}'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from jinja2.exceptions import TemplateError

from prefect_rayllm.rayllm_stages.config.models import PromptTemplate
from prefect_rayllm.rayllm_stages.llm.prompts import render_messages, template_fields
from prefect_rayllm.rayllm_stages.llm.rows import EngineSampling


@dataclass(frozen=True)
class ChatRequest:
    """What a step sends the engine for one row."""

    messages: list[dict[str, Any]]
    sampling: EngineSampling


@runtime_checkable
class LLMStep(Protocol):
    """One step of a pipeline: what it asks a model for each row, and what it keeps of the reply."""

    name: str
    images: bool  # requests carry images (Ray's multimodal stage parses them)
    json_schema: dict[str, Any] | None  # replies are JSON following it (structured outputs on)
    sampling: EngineSampling  # the step's own sampling (a batch row brings its own)
    placeholder: ChatRequest  # what a row that does not run sends: one token, the shape of `request`'s

    def request(self, row: Mapping[str, Any]) -> ChatRequest:
        """The request for `row`; raises `StepFailed` when the row cannot be asked."""
        ...

    def record(self, row: Mapping[str, Any], text: str) -> str:
        """`row`'s new `row_json` with the reply kept; raises `StepFailed` when the reply is unusable."""
        ...


TEXT_PLACEHOLDER = [{"role": "user", "content": "."}]


class StepFailed(ValueError):
    """A row that cannot go on past this step; the message says why (the row and step are added
    by whoever writes the error)."""

    code = "step_error"


class PayloadStep:
    """Batch jobs: the request (messages + sampling, checked when the input was read) is in
    `row_json` as {"messages": [...], "sampling": {...}, "row": table columns or null}."""

    name = "batch"
    images = False
    json_schema = None
    sampling = EngineSampling()
    placeholder = ChatRequest(TEXT_PLACEHOLDER, EngineSampling().placeholder())

    def request(self, row: Mapping[str, Any]) -> ChatRequest:
        payload = json.loads(row["row_json"])
        return ChatRequest(payload["messages"], EngineSampling.model_validate(payload["sampling"]))

    def record(self, row: Mapping[str, Any], text: str) -> str:
        return row["row_json"]


class TemplateStep:
    """Chain steps: a prompt template over the row (input columns and earlier outputs), and an
    output column that receives the text, or JSON checked against a schema."""

    images = False

    def __init__(
        self,
        name: str,
        prompt: PromptTemplate,
        sampling: Any,
        output_column: str,
        parse: str = "text",
        json_schema: dict[str, Any] | None = None,
    ):
        self.name = name
        self.prompt = prompt
        self.sampling = EngineSampling.coerce(sampling)
        if json_schema is not None:
            self.sampling = self.sampling.with_json_schema(json.dumps(json_schema))
        self.placeholder = ChatRequest(TEXT_PLACEHOLDER, self.sampling.placeholder())
        self.output_column = output_column
        self.parse = parse
        self.json_schema = json_schema
        self.fields = sorted(set().union(*template_fields(prompt).values()))

    def request(self, row: Mapping[str, Any]) -> ChatRequest:
        data = json.loads(row["row_json"])
        empty = [name for name in self.fields if data.get(name) is None]
        if empty:
            present = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "none"
            raise StepFailed(f"field(s) {', '.join(map(repr, empty))} are null or missing (non-null fields: {present})")
        try:
            return ChatRequest(render_messages(self.prompt, data), self.sampling)
        except TemplateError as exc:
            raise StepFailed(f"prompt template failed: {exc}") from None

    def record(self, row: Mapping[str, Any], text: str) -> str:
        value: Any = text
        if self.parse == "json":
            value = parse_json_reply(text, self.json_schema)
        data = json.loads(row["row_json"])
        data[self.output_column] = value
        return json.dumps(data, ensure_ascii=False, default=str)


def parse_json_reply(text: str, schema: dict[str, Any] | None) -> Any:
    """The reply as JSON, checked against `schema`; raises `StepFailed` naming what is wrong."""
    try:
        value = json.loads(text, strict=False)  # a weak model may put control characters in strings
    except json.JSONDecodeError as exc:
        raise StepFailed(f"reply is not valid JSON ({exc.msg}): {text[:200]!r}") from None
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise StepFailed(f"reply does not match the schema at {where}: {exc.message}") from None
    return value
