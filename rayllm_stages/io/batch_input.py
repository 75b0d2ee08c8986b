"""Reading batch input: OpenAI Batch JSONL or a JSONL/Parquet table, one checked row at a time.

Every input row becomes exactly one `Request` (ready for the engine) or one `RowError` (with the
row's line or index, its id when it has one, an error code and a message naming the field).
Rows stream: nothing but the set of seen ids is held in memory.

A request has one shape whatever its line held (the row contract, `llm.rows`): messages are
`{"role", "content"}` with string content (OpenAI list-form text parts are joined with a newline,
as vLLM's OpenAI server does for string chat templates), and the sampling is a complete
`EngineSampling` (the config's defaults, then the body's fields).

Example (OpenAI Batch line in -> Request):
    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}}
    -> Request(index=0, key="r1", messages=[{"role": "user", "content": "Hi"}],
               sampling=EngineSampling(..., max_tokens=8), row=None)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from prefect_rayllm.rayllm_stages.config.base import ConfigError, InputUnavailable
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig, SamplingParams
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.llm.prompts import check_template_fields, render_messages, template_fields
from prefect_rayllm.rayllm_stages.llm.rows import EngineSampling

InputFormat = Literal["openai_batch", "jsonl", "parquet"]

SUPPORTED_URLS = ("/v1/chat/completions",)
ROLES = ("system", "developer", "user", "assistant", "tool")
# Body fields that carry no sampling meaning for us.
IGNORED_BODY_FIELDS = {"model", "messages", "user", "metadata", "store", "n", "stream"}
# OpenAI names -> our SamplingParams names.
BODY_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
}
RAW_EXCERPT_CHARS = 200


@dataclass
class Request:
    """One row ready for the engine."""

    index: int
    key: str
    messages: list[dict[str, str]]
    sampling: EngineSampling
    row: dict[str, Any] | None = None  # table inputs: the input columns, echoed in the results


@dataclass
class RowError:
    """One input row that cannot run, and why."""

    index: int
    key: str | None
    code: str
    message: str
    raw: str | None = None


def detect_format(config: BatchJobConfig, source: Location) -> InputFormat:
    """The input's format: as configured, or from the suffix and the first non-blank line."""
    if config.input_format != "auto":
        return config.input_format
    if source.path.endswith(".parquet"):
        return "parquet"
    first = _first_non_blank_line(source)
    try:
        record = json.loads(first) if first else None
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "custom_id" in record and "body" in record:
        return "openai_batch"
    if config.prompt is not None:
        return "jsonl"
    return "openai_batch"  # its per-line checks explain what is wrong with each line


def check_input(config: BatchJobConfig) -> InputFormat:
    """Check, before any engine starts, that the input exists and fits the config."""
    source = Location(config.input, config.storage_options)
    if not source.exists():
        raise InputUnavailable(f"input: {config.input} does not exist")
    fmt = detect_format(config, source)
    if fmt == "openai_batch":
        if config.prompt is not None:
            raise ConfigError("prompt: an OpenAI Batch input carries its own messages; remove prompt")
        if config.id_column is not None:
            raise ConfigError("id_column: an OpenAI Batch input is keyed by custom_id; remove id_column")
        return fmt
    if config.prompt is None:
        raise ConfigError(f"prompt: {config.input} is a table ({fmt}) and needs a prompt template")
    check_template_fields(config.prompt, _checked_table_columns(config, source, fmt), config.input)
    return fmt


def table_columns(source: Location, fmt: InputFormat, sample_rows: int = 100) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with source.open("rb") as handle:
            return list(pq.ParquetFile(handle).schema_arrow.names)
    columns: dict[str, None] = {}
    for number, line in enumerate(_non_blank_lines(source)):
        if number >= sample_rows:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    return list(columns)


def read_requests(config: BatchJobConfig, fmt: InputFormat) -> Iterator[Request | RowError]:
    """Every input row, in input order, as a `Request` or a `RowError`."""
    source = Location(config.input, config.storage_options)
    if fmt == "openai_batch":
        yield from _openai_batch_rows(source, config.sampling)
    else:
        yield from _table_rows(source, fmt, config)


def count_rows(config: BatchJobConfig, fmt: InputFormat) -> int:
    source = Location(config.input, config.storage_options)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with source.open("rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    return sum(1 for _ in _non_blank_lines(source))


def _openai_batch_rows(source: Location, defaults: SamplingParams) -> Iterator[Request | RowError]:
    seen: dict[str, int] = {}
    for index, line in enumerate(_non_blank_lines(source)):
        key = batch_key(line)
        earlier = seen.get(key) if key is not None else None
        if key is not None and earlier is None:
            seen[key] = index
        yield batch_line(index, line, defaults, earlier)


def batch_key(line: str) -> str | None:
    """The custom_id of an OpenAI Batch line whose id is checked for repeats (None: no usable id)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    custom_id = record.get("custom_id") if isinstance(record, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None


def batch_line(index: int, line: str | None, defaults: SamplingParams, earlier: int | None = None) -> Request | RowError:
    """One OpenAI Batch line (row `index`) as a `Request` or a `RowError`; `earlier`: the row that
    already used its custom_id. `line` None: the line is not UTF-8."""
    line_no = index + 1
    record = _json_object(index, line, "invalid_request")
    if isinstance(record, RowError):
        return record
    assert line is not None  # a line that is not UTF-8 is a RowError above
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return RowError(index, None, "missing_custom_id", f"line {line_no}: custom_id must be a non-empty string", _excerpt(line))
    if earlier is not None:
        return RowError(
            index,
            custom_id,
            "duplicate_custom_id",
            f"line {line_no}: custom_id {custom_id!r} is already used on line {earlier + 1}",
        )
    problem = _request_problem(record)
    if problem:
        code, message = problem
        return RowError(index, custom_id, code, f"line {line_no} ({custom_id}): {message}")
    body = record["body"]
    sampling = _row_sampling(defaults, body)
    if isinstance(sampling, str):
        return RowError(index, custom_id, "invalid_sampling", f"line {line_no} ({custom_id}): {sampling}")
    return Request(index, custom_id, _plain_messages(body["messages"]), sampling)


def _request_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    method = record.get("method", "POST")
    if method != "POST":
        return "unsupported_method", f"method {method!r} is not supported (only POST)"
    url = record.get("url")
    if url not in SUPPORTED_URLS:
        return "unsupported_url", f"url {url!r} is not supported (supported: {', '.join(SUPPORTED_URLS)})"
    body = record.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "body must be a JSON object"
    if body.get("stream"):
        return "unsupported_field", "body.stream must be false in a batch"
    if body.get("n", 1) != 1:
        return "unsupported_field", "body.n must be 1"
    unsupported = sorted(set(body) - IGNORED_BODY_FIELDS - set(BODY_SAMPLING_FIELDS))
    if unsupported:
        return "unsupported_field", f"body field(s) {', '.join(unsupported)} are not supported"
    return _messages_problem(body.get("messages"))


def _messages_problem(messages: Any) -> tuple[str, str] | None:
    if not isinstance(messages, list) or not messages:
        return "empty_messages", "body.messages must be a non-empty list"
    for position, message in enumerate(messages):
        where = f"body.messages[{position}]"
        if not isinstance(message, dict):
            return "invalid_message", f"{where} must be an object"
        if message.get("role") not in ROLES:
            return "invalid_message", f"{where}.role must be one of {', '.join(ROLES)}"
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return "invalid_message", f"{where}.content must be a string or a non-empty list of parts"
        for part_no, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                return "unsupported_content", (
                    f"{where}.content[{part_no}] of type {kind!r} is not supported here (text parts only; "
                    "images go through the curation flow)"
                )
    if messages[-1].get("role") not in ("user", "tool"):
        return "invalid_message", "the last message must be from the user (or a tool)"
    return None


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages of one shape: role and string content (text parts joined with a newline)."""
    plain = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "\n".join(part["text"] for part in content)
        plain.append({"role": message["role"], "content": content})
    return plain


def _row_sampling(defaults: SamplingParams, body: dict[str, Any]) -> EngineSampling | str:
    """Defaults overridden by the body's sampling fields, or a message naming the bad field."""
    overrides: dict[str, Any] = {}
    for name, ours in BODY_SAMPLING_FIELDS.items():
        if name in body and body[name] is not None:
            value = body[name]
            overrides[ours] = [value] if ours == "stop" and isinstance(value, str) else value
    try:
        return EngineSampling.from_params(SamplingParams.model_validate({**defaults.model_dump(), **overrides}))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        return f"body.{field}: {first['msg']}" if field else f"body: {first['msg']}"


def _table_rows(source: Location, fmt: InputFormat, config: BatchJobConfig) -> Iterator[Request | RowError]:
    render = TableRequests(config)
    for item in keyed_table_rows(source, fmt, config.id_column):
        yield item if isinstance(item, RowError) else render(*item)


class TableRequests:
    """A keyed table row -> its `Request` (the prompt rendered) or why it cannot run; picklable, so
    workers that read the input render there."""

    def __init__(self, config: BatchJobConfig):
        assert config.prompt is not None
        self.prompt = config.prompt
        self.sampling = EngineSampling.from_params(config.sampling)
        self.needed = sorted(set().union(*template_fields(config.prompt).values()))

    def __call__(self, index: int, key: str, row: dict[str, Any]) -> Request | RowError:
        where = f"row {index} ({key})"
        empty = [name for name in self.needed if row.get(name) is None]
        if empty:
            return RowError(index, key, "missing_field", f"{where}: field(s) {', '.join(map(repr, empty))} are null or missing")
        try:
            messages = render_messages(self.prompt, row)
        except TemplateError as exc:
            return RowError(index, key, "template_error", f"{where}: prompt template failed: {exc}")
        return Request(index, key, messages, self.sampling, row=row)


def keyed_table_rows(
    source: Location, fmt: InputFormat, id_column: str | None
) -> Iterator[tuple[int, str, dict[str, Any]] | RowError]:
    """Table rows with their id (the id column, or the row index); bad or repeated ids are errors."""
    seen: dict[str, int] = {}
    for index, row in _table_records(source, fmt):
        if isinstance(row, RowError):
            yield row
            continue
        key = row_key(row, id_column, index)
        earlier = seen.get(key) if key is not None and id_column is not None else None
        if key is not None and earlier is None:
            seen[key] = index
        yield keyed_row(index, row, id_column, earlier)


def row_key(row: dict[str, Any], id_column: str | None, index: int) -> str | None:
    """A table row's id: the id column's value as text (None when empty), or the row index."""
    if id_column is None:
        return str(index)
    value = row.get(id_column)
    return None if value is None or value == "" else str(value)


def table_key(line: str, id_column: str) -> str | None:
    """The id of a JSON Lines table line, for the repeat check (None: no usable id)."""
    record = table_record(0, line)
    return None if isinstance(record, RowError) else row_key(record, id_column, 0)


def keyed_row(
    index: int, row: dict[str, Any], id_column: str | None, earlier: int | None = None
) -> tuple[int, str, dict[str, Any]] | RowError:
    """A table row with its id, or why its id is unusable (`earlier`: the row that already has it)."""
    key = row_key(row, id_column, index)
    if key is None:
        return RowError(index, None, "missing_id", f"row {index}: column {id_column!r} is empty")
    if earlier is not None:
        return RowError(index, key, "duplicate_id", f"row {index}: id {key!r} appears more than once (first at row {earlier})")
    return index, key, row


def table_record(index: int, line: str | None) -> dict[str, Any] | RowError:
    """One JSON Lines table line (row `index`) as its record, or why it is not one."""
    return _json_object(index, line, "invalid_row")


def _json_object(index: int, line: str | None, not_an_object: str) -> dict[str, Any] | RowError:
    """A line (row `index`; None: not UTF-8) as a JSON object, or the row error saying why not
    (`not_an_object`: the code for valid JSON that is not an object)."""
    if line is None:
        return RowError(index, None, "invalid_encoding", f"line {index + 1}: not valid UTF-8")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return RowError(index, None, "invalid_json", f"line {index + 1}: not valid JSON ({exc.msg})", _excerpt(line))
    if not isinstance(record, dict):
        return RowError(index, None, not_an_object, f"line {index + 1}: must be a JSON object", _excerpt(line))
    return record


def check_table_input(config: Any) -> InputFormat:
    """For table-only jobs: the input exists, is a table, and has the id column."""
    source = Location(config.input, config.storage_options)
    if not source.exists():
        raise InputUnavailable(f"input: {config.input} does not exist")
    if config.input_format != "auto":
        fmt = config.input_format
    else:
        fmt = "parquet" if source.path.endswith(".parquet") else "jsonl"
    _checked_table_columns(config, source, fmt)
    return fmt


def _checked_table_columns(config: Any, source: Location, fmt: InputFormat) -> list[str]:
    columns = table_columns(source, fmt)
    if config.id_column is not None and config.id_column not in columns:
        raise ConfigError(f"id_column: {config.input} has no column {config.id_column!r}")
    return columns


def _table_records(source: Location, fmt: InputFormat) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    if fmt == "parquet":
        yield from enumerate(parquet_records(source))
        return
    for index, line in enumerate(_non_blank_lines(source)):
        yield index, table_record(index, line)


def parquet_records(source: Location) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with source.open("rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _non_blank_lines(source: Location) -> Iterator[str]:
    for line in source.iter_lines():
        if line.strip():
            yield line


def _first_non_blank_line(source: Location) -> str | None:
    return next(_non_blank_lines(source), None)


def _excerpt(line: str) -> str:
    line = line.rstrip("\n")
    return line if len(line) <= RAW_EXCERPT_CHARS else line[:RAW_EXCERPT_CHARS] + "…"
