"""What one LLM step asks and keeps: the request it builds from a row, and what it writes back.

A step object is handed to the `ray.data.llm` processor's preprocess and postprocess (it is pickled
to the Ray workers, so it holds plain data only).

Row columns between steps:
    row_index, row_key   the input row's position and id
    row_json             the row as JSON: input columns plus every earlier step's output column
    usage_json           per step: {"in": prompt tokens, "out": generated tokens, "latency_s": ...}
    payload_json         batch jobs only: the OpenAI request (messages, sampling)
    failed_step          the step a failed row failed in
    __inference_error__  Ray's error column: non-empty rows skip every later stage and step
"""

from __future__ import annotations

import json
from typing import Any

from jinja2.exceptions import TemplateError

from prefect_rayllm.rayllm_stages.config.models import PromptTemplate
from prefect_rayllm.rayllm_stages.llm.prompts import render_messages, template_fields

ERROR_COLUMN = "__inference_error__"
PASSTHROUGH = ("row_index", "row_key", "row_json", "usage_json", "payload_json")


class InjectedFault:
    """Test-only: crash a step once, after it has seen `after_rows` rows in all (a fault we inject
    to prove resume). Rows are counted in a file beside `marker`, since Ray runs the step in many
    processes, each with its own copy of this object; `marker` records that it fired so a rerun
    goes through."""

    def __init__(self, after_rows: int, marker: str):
        self.after_rows = after_rows
        self.marker = marker

    def maybe_fire(self) -> None:
        import os

        counter = self.marker + ".rows"
        with open(counter, "ab") as handle:  # one byte per row; appends are atomic across processes
            handle.write(b".")
        if os.path.getsize(counter) > self.after_rows and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected fault after {self.after_rows} rows")


class StepFailed(ValueError):
    """A row that cannot go on past this step; the message names step, row and reason."""


class PayloadStep:
    """Batch jobs: the request (messages + sampling) is prepared in `payload_json`."""

    name = "batch"

    def request(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        payload = json.loads(row["payload_json"])
        return payload["messages"], payload["sampling"]

    def record(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        return {}


class TemplateStep:
    """Chain steps: a prompt template over the row (input columns and earlier outputs), and an
    output column that receives the text, or JSON checked against a schema."""

    def __init__(
        self,
        name: str,
        prompt: PromptTemplate,
        sampling: dict[str, Any],
        output_column: str,
        parse: str = "text",
        json_schema: dict[str, Any] | None = None,
    ):
        self.name = name
        self.prompt = prompt
        self.sampling = dict(sampling)
        if json_schema is not None:
            # A string, not a dict: a nested schema as an Arrow struct breaks Ray Data's block
            # concatenation when blocks differ; vLLM takes the schema as a JSON string as well.
            self.sampling["structured_outputs"] = {"json": json.dumps(json_schema)}
        self.output_column = output_column
        self.parse = parse
        self.json_schema = json_schema
        self.fields = sorted(set().union(*template_fields(prompt).values()))
        self.injected_fault: InjectedFault | None = None

    def request(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        data = json.loads(row["row_json"])
        empty = [name for name in self.fields if data.get(name) is None]
        if empty:
            present = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "none"
            raise StepFailed(f"field(s) {', '.join(map(repr, empty))} are null or missing (non-null fields: {present})")
        try:
            return render_messages(self.prompt, data), self.sampling
        except TemplateError as exc:
            raise StepFailed(f"prompt template failed: {exc}") from None

    def record(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        value: Any = text
        if self.parse == "json":
            value = parse_json_reply(text, self.json_schema)
        data = json.loads(row["row_json"])
        data[self.output_column] = value
        return {"row_json": json.dumps(data, ensure_ascii=False, default=str)}


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
