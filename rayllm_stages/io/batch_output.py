"""Output lines: OpenAI Batch output (vLLM run_batch's shape) for OpenAI input, row records for tables.

OpenAI Batch result line:
    {"id": "batch_req_…", "custom_id": "r1", "error": null,
     "response": {"status_code": 200, "request_id": "…", "body": {"object": "chat.completion", …}}}
Error line: the same keys, with "response": null (or the HTTP error response) and
    "error": {"code": "duplicate_custom_id", "message": "line 7 (r1): …", "line": 7}
Table result: the input columns plus generated_text, finish_reason, num_input_tokens,
num_generated_tokens and `_row_id` (the id column's value, or the input row number: results come
in completion order, not input order). Table error: {"row_index", "row_id", "error": {"code", "message"}}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.llm import rows

ROW_ID_FIELD = "_row_id"


# Characters that JSON allows raw in a string but that many line readers (Python's str.splitlines,
# JavaScript) take for a line break: escaped, so that every record stays on its own line.
_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record: Any) -> str:
    """One JSON Lines record: non-ASCII text kept readable, line-break characters escaped."""
    line = json.dumps(record, ensure_ascii=False, default=str)
    for char, escaped in _LINE_BREAKS.items():
        line = line.replace(char, escaped)
    return line


def _stable_id(prefix: str, *parts: str) -> str:
    return prefix + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def finish_reason(generated_tokens: int, max_tokens: int | None) -> str:
    # Ray's vLLM stage does not report vLLM's finish reason; hitting max_tokens is "length".
    return "length" if max_tokens is not None and generated_tokens >= max_tokens else "stop"


class OpenAIBatchFormat:
    """Lines in the OpenAI Batch output format, keyed by custom_id."""

    def __init__(self, model_name: str, run_key: str):
        self.model_name = model_name
        self.run_key = run_key

    def result(self, row: Mapping[str, Any]) -> str:
        key = row["row_key"]
        sampling = json.loads(row["row_json"])["sampling"]
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        body = {
            "id": _stable_id("chatcmpl-", self.run_key, key),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row["generated_text"]},
                    "logprobs": None,
                    "finish_reason": finish_reason(completion_tokens, sampling.get("max_tokens")),
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return self._line(key, {"status_code": 200, "request_id": _stable_id("req-", self.run_key, key), "body": body}, None)

    def engine_error(self, row: Mapping[str, Any], failure: rows.RowFailure) -> tuple[str, str]:
        """The error line of a row that failed in the pipeline, and its code."""
        key, code, message = row["row_key"], failure.code, failure.message
        status = int(row.get("http_status") or 0) or 400
        error = {"code": code, "message": f"line {row['row_index'] + 1} ({key}): {message}", "line": row["row_index"] + 1}
        response = {
            "status_code": status,
            "request_id": _stable_id("req-", self.run_key, key),
            "body": {"error": {"message": message, "type": code}},
        }
        return self._line(key, response, error), code

    def input_error(self, problem: RowError) -> str:
        error: dict[str, Any] = {"code": problem.code, "message": problem.message, "line": problem.index + 1}
        if problem.raw is not None:
            error["raw"] = problem.raw
        return self._line(problem.key, None, error, index=problem.index)

    def _line(
        self, key: str | None, response: dict[str, Any] | None, error: dict[str, Any] | None, index: int | None = None
    ) -> str:
        ident = _stable_id("batch_req_", self.run_key, key if key is not None else f"#line{index}")
        return json_line({"id": ident, "custom_id": key, "response": response, "error": error})


class TableFormat:
    """Table rows: the input columns plus the generation; errors name the row."""

    def result(self, row: Mapping[str, Any]) -> str:
        payload = json.loads(row["row_json"])
        source, sampling = payload["row"], payload["sampling"]
        generated = row["num_generated_tokens"]
        record = {
            **source,
            "generated_text": row["generated_text"],
            "finish_reason": finish_reason(generated, sampling.get("max_tokens")),
            "num_input_tokens": row["num_input_tokens"],
            "num_generated_tokens": generated,
            ROW_ID_FIELD: row["row_key"],
        }
        return json_line(record)

    def engine_error(self, row: Mapping[str, Any], failure: rows.RowFailure) -> tuple[str, str]:
        text = f"row {row['row_index']} ({row['row_key']}): {failure.message}"
        return self._line(row["row_index"], row["row_key"], failure.code, text), failure.code

    def input_error(self, problem: RowError) -> str:
        return self._line(problem.index, problem.key, problem.code, problem.message, problem.raw)

    @staticmethod
    def _line(index: int, key: str | None, code: str, message: str, raw: str | None = None) -> str:
        error: dict[str, Any] = {"code": code, "message": message}
        if raw is not None:
            error["raw"] = raw
        return json_line({"row_index": index, "row_id": key, "error": error})
