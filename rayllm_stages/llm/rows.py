"""The row contract: the columns every row carries between our stages and Ray's, declared once.

Ray Data builds each block's Arrow types from the values its rows happen to hold: a key that some
rows of a block lack, or hold as None, becomes a nullable column, and nullable ints come back as
floats when Ray hands the block to the next stage (STACK.md, "Arrow blocks"). One odd row then
breaks its whole block (issue 11: a placeholder request lacking `top_k` turned every neighbour's
`top_k` into a float that vLLM refused; a row without `seed` did the same to its neighbours'
seeds, and vLLM's engine core stopped reading requests). So nothing that travels between stages is left to
inference:

- `ROW_SCHEMA` (Arrow) and `StageRow` (pydantic) declare the columns, with fixed types, that every
  row holds between stages, for batch, chain, evaluation and curation alike. A failed row has the
  same columns and types as a good one; its `row_error` says what failed, where and why.
- `EngineSampling` declares the sampling parameters a row sends to vLLM: a complete key set with
  fixed types for every row, no nulls in integer fields (`top_k` -1 and `seed` -1 mean "off", as
  vLLM reads them).
- `conform` projects any engine output (a good row, our failed row, or Ray's own error row) back
  onto `ROW_SCHEMA`.

Columns (`ROW_SCHEMA`):
    row_index             int64    the input row's position (line number - 1)
    row_key               string   its id: custom_id, the id column's value, or the row number
    row_json              string   the row's data, a JSON object: table columns plus each step's
                                   output column; for batch jobs the request (messages, sampling, row)
    usage_json            string   per step: {"in": prompt tokens, "out": generated, "latency_s": s}
    row_error             struct   {code, message, step}: code "" while the row is good
    generated_text        string   the last step's reply ("" on a failed row)
    num_input_tokens      int64    of the last step (0 on a failed row)
    num_generated_tokens  int64
    latency_s             double   the last step's engine latency (null when unknown)
    http_status           int64    the reply's HTTP status (200 for in-process engines; 0: none)

Example (a chain row failing in its first step, then passing the second untouched):
    {"row_index": 4, "row_key": "c4", "row_json": "{\"cid\": \"c4\", \"colour\": null}", ...,
     "row_error": {"code": "step_error", "message": "field(s) 'colour' are null or missing ...",
               "step": "reformat"}, "generated_text": "", "num_input_tokens": 0, ...}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# Ray's own error column: a row whose value is not "" skips every later Ray stage and our postprocess.
RAY_ERROR_COLUMN = "__inference_error__"
# Ours: named so that no stage's output can overwrite it (a Serve reply merged into the row has an
# `error` key of its own).
ERROR_COLUMN = "row_error"

ERROR_TYPE = pa.struct(
    [pa.field("code", pa.string(), False), pa.field("message", pa.string(), False), pa.field("step", pa.string(), False)]
)
ROW_SCHEMA = pa.schema(
    [
        pa.field("row_index", pa.int64(), False),
        pa.field("row_key", pa.string(), False),
        pa.field("row_json", pa.string(), False),
        pa.field("usage_json", pa.string(), False),
        pa.field(ERROR_COLUMN, ERROR_TYPE, False),
        pa.field("generated_text", pa.string(), False),
        pa.field("num_input_tokens", pa.int64(), False),
        pa.field("num_generated_tokens", pa.int64(), False),
        pa.field("latency_s", pa.float64(), True),
        pa.field("http_status", pa.int64(), False),
    ]
)
ROW_COLUMNS = tuple(ROW_SCHEMA.names)

_TOO_LONG = re.compile(r"longer than the maximum model length|maximum context length|too long", re.I)


class RowFailure(BaseModel):
    """Why a row failed, and in which step: the one error representation every stage passes on.

    Codes: `prompt_too_long`, `step_error` (the step could not build the request or use the reply),
    `engine_error` (the engine refused or failed), and the stage-specific codes of earlier stages
    (curation: `fetch_error`, `decode_error`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str = Field(min_length=1)
    message: str
    step: str

    @classmethod
    def from_engine(cls, message: str, step: str) -> RowFailure:
        """An engine's refusal: `prompt_too_long` when it says so, else `engine_error`."""
        return cls(code="prompt_too_long" if _TOO_LONG.search(message) else "engine_error", message=message, step=step)

    def column(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "step": self.step}


NO_ERROR: dict[str, str] = {"code": "", "message": "", "step": ""}


def failure_of(row: Mapping[str, Any]) -> RowFailure | None:
    """The error a row carries, or None for a good row."""
    error = row.get(ERROR_COLUMN)
    if error and error.get("code"):
        return RowFailure(code=error["code"], message=error.get("message") or "", step=error.get("step") or "")
    return None


class StageRow(BaseModel):
    """One row between stages (`ROW_SCHEMA` as a pydantic model)."""

    model_config = ConfigDict(extra="forbid")

    row_index: int = Field(ge=0)
    row_key: str
    row_json: str = "{}"
    usage_json: str = "{}"
    row_error: dict[str, str] = Field(default_factory=lambda: dict(NO_ERROR))
    generated_text: str = ""
    num_input_tokens: int = 0
    num_generated_tokens: int = 0
    latency_s: float | None = None
    http_status: int = 0


def rows_table(rows: Iterable[Mapping[str, Any]], extra: pa.Schema | None = None) -> pa.Table:
    """An Arrow table of `ROW_SCHEMA` (plus the `extra` columns a step reads, e.g. an image)."""
    schema = ROW_SCHEMA if extra is None else pa.unify_schemas([ROW_SCHEMA, extra])
    records = []
    for row in rows:
        record = StageRow.model_validate({k: row[k] for k in ROW_COLUMNS if k in row}).model_dump()
        if extra is not None:
            record.update({name: row.get(name) for name in extra.names})
        records.append(record)
    return pa.Table.from_pylist(records, schema=schema)


def conform(batch: pa.Table, step: str) -> pa.Table:
    """Ray Data map (pyarrow batches): any engine output row onto `ROW_SCHEMA`.

    Good rows and rows that failed in our stages keep their values; a row that Ray's stages
    failed themselves (its `__inference_error__` set, our postprocess skipped) gets that reason as
    its `row_error` (code `prompt_too_long` or `engine_error`, in `step`). Any other column (Ray's
    intermediates, the request) is dropped, so every block leaves the engine with one schema.
    """
    rows = []
    for row in batch.to_pylist():
        ray_error = row.get(RAY_ERROR_COLUMN) or ""
        if ray_error and failure_of(row) is None:
            row = {**_failed_columns(row), ERROR_COLUMN: RowFailure.from_engine(str(ray_error), step).column()}
        elif failure_of(row) is not None:  # ours: keeps the HTTP status of the reply that failed it
            row = {**_failed_columns(row), ERROR_COLUMN: row[ERROR_COLUMN], "http_status": row.get("http_status") or 0}
        rows.append(row)
    return rows_table(rows)


def _failed_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """A failed row's carried columns; the result columns are reset (nothing was generated)."""
    return {name: row[name] for name in ("row_index", "row_key", "row_json", "usage_json") if row.get(name) is not None}


class StructuredOutputs(BaseModel):
    """vLLM structured outputs: the reply follows this JSON schema (as JSON text: a schema as a
    nested Arrow struct would differ from block to block)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_schema: str = Field(alias="json")


class EngineSampling(BaseModel):
    """The sampling parameters one row sends to the engine: every key, every row, fixed types.

    `top_k` -1 and `seed` -1 mean "off" (vLLM reads them so), because a null int would make its
    column nullable and turn the other rows' values into floats.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int = -1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured_outputs: StructuredOutputs | None = None

    @classmethod
    def from_params(cls, params: Any, **overrides: Any) -> EngineSampling:
        """From the config's `SamplingParams` (None = off becomes -1 / empty)."""
        return cls.from_values({**params.model_dump(), **overrides})

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> EngineSampling:
        """From plain values where None (or a missing key) means "off" or "default"."""
        values = {k: v for k, v in values.items() if v is not None}
        if values.get("top_k") == 0:
            values["top_k"] = -1
        if "stop" in values:
            values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
        return cls.model_validate(values)

    @classmethod
    def coerce(cls, value: Any) -> EngineSampling:
        """An `EngineSampling`, a config `SamplingParams` or a plain dict, as `EngineSampling`."""
        if isinstance(value, EngineSampling):
            return value
        if isinstance(value, Mapping):
            return cls.from_values(value)
        return cls.from_params(value)

    def with_json_schema(self, schema_json: str) -> EngineSampling:
        return self.model_copy(update={"structured_outputs": StructuredOutputs(json=schema_json)})

    def placeholder(self) -> EngineSampling:
        """The same keys and types, for one token: what a row that does not run sends (see `engines`)."""
        return self.model_copy(update={"max_tokens": 1, "min_tokens": 0})

    def for_vllm(self) -> dict[str, Any]:
        """`vllm.SamplingParams` kwargs, as Ray's vLLM stage reads them from the row."""
        values = self.model_dump(by_alias=True)
        values["stop"] = list(self.stop)
        return values

    def for_openai(self) -> dict[str, Any]:
        """OpenAI chat completion body fields. vLLM's extensions (`top_k`, `min_tokens`,
        `repetition_penalty`) and unset fields are left out when neutral, so that any
        OpenAI-compatible server takes the body."""
        body: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.top_k not in (-1, 0):
            body["top_k"] = self.top_k
        if self.min_tokens:
            body["min_tokens"] = self.min_tokens
        if self.repetition_penalty != 1.0:
            body["repetition_penalty"] = self.repetition_penalty
        if self.stop:
            body["stop"] = list(self.stop)
        if self.seed != -1:
            body["seed"] = self.seed
        if self.structured_outputs is not None:
            import json

            schema = json.loads(self.structured_outputs.json_schema)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        return body


SAMPLING_TYPE = pa.struct(
    [
        pa.field("temperature", pa.float64(), False),
        pa.field("top_p", pa.float64(), False),
        pa.field("top_k", pa.int64(), False),
        pa.field("max_tokens", pa.int64(), False),
        pa.field("min_tokens", pa.int64(), False),
        pa.field("stop", pa.list_(pa.string()), False),
        pa.field("seed", pa.int64(), False),
        pa.field("presence_penalty", pa.float64(), False),
        pa.field("frequency_penalty", pa.float64(), False),
        pa.field("repetition_penalty", pa.float64(), False),
        pa.field("structured_outputs", pa.struct([pa.field("json", pa.string(), False)]), True),
    ]
)
"""`EngineSampling.for_vllm()` as Arrow: the type the `sampling_params` column has in every block."""
