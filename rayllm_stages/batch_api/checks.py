"""An uploaded file checked for a batch, before any run exists: the whole file, line by line.

Every line goes through the checks `rayllm batch` applies to an OpenAI Batch input
(`io.batch_input.read_requests`: JSON object, custom_id present and unique, POST to
/v1/chat/completions, messages, supported body fields, sampling values). On top of those, as
OpenAI's Batch API requires: `body.model` names a configured model, and one model for the whole
file (a batch runs one engine). A file with any bad line fails the batch, each bad line named:

    line 3: not valid JSON (Expecting value)                               code invalid_json
    line 7: body.model 'gpt-4o' is not served here; known models: tiny     code model_not_found
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect_rayllm.rayllm_stages.batch_api.objects import BatchError
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig, SamplingParams
from prefect_rayllm.rayllm_stages.io.batch_input import RowError, read_requests
from prefect_rayllm.rayllm_stages.io.storage import Location

MAX_ERRORS = 100  # reported per batch; the count of all bad lines is in the last message


@dataclass
class CheckedFile:
    """What the checks found: the one model, the number of requests, and the bad lines (first MAX_ERRORS)."""

    model: str | None
    requests: int
    errors: list[BatchError] = field(default_factory=list)
    bad_lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def check_batch_file(
    url: str,
    models: Collection[str],
    storage_options: dict[str, Any] | None = None,
    sampling: SamplingParams | None = None,
    max_errors: int = MAX_ERRORS,
) -> CheckedFile:
    """Check every line of the file at `url` for a batch on one of `models`.

    Lines are counted as `rayllm batch` counts them (blank lines skipped), so a line number here is
    the one its errors file would name.
    """
    options = dict(storage_options or {})
    config = BatchJobConfig(
        input=url,
        output=url + ".check",  # not written: only the input is read
        input_format="openai_batch",
        model={"source": "unused"},
        sampling=sampling or SamplingParams(),
        storage_options=options,
    )
    by_line: dict[int, BatchError] = {}
    requests = 0
    for item in read_requests(config, "openai_batch"):
        requests += 1
        if isinstance(item, RowError):
            by_line[item.index + 1] = _error_of(item)
    chosen: str | None = None
    chosen_line = 0
    for line_no, body in _bodies(Location(url, options)):
        if line_no in by_line:
            continue
        model = body.get("model")
        problem: BatchError | None = None
        if not isinstance(model, str) or not model:
            problem = _model_error(line_no, "missing_required_parameter", "body.model is required (a configured model)", models)
        elif model not in models:
            problem = _model_error(line_no, "model_not_found", f"body.model {model!r} is not served here", models)
        elif chosen is None:
            chosen, chosen_line = model, line_no
        elif model != chosen:
            problem = BatchError(
                code="mismatched_model",
                line=line_no,
                param="body.model",
                message=f"line {line_no}: body.model {model!r} differs from {chosen!r} on line {chosen_line}; "
                "a batch runs one model",
            )
        if problem is not None:
            by_line[line_no] = problem
    errors = [by_line[line] for line in sorted(by_line)]
    if not errors and requests == 0:
        errors = [BatchError(code="empty_file", message="the input file holds no requests")]
    bad = len(errors)
    if bad > max_errors:
        errors = errors[:max_errors]
        errors.append(BatchError(code="too_many_errors", message=f"{bad} lines are bad; the first {max_errors} are listed"))
    return CheckedFile(model=chosen, requests=requests, errors=errors, bad_lines=bad)


def _error_of(problem: RowError) -> BatchError:
    line = problem.index + 1
    message = problem.message if problem.message.startswith(f"line {line}") else f"line {line}: {problem.message}"
    return BatchError(code=problem.code, line=line, message=message)


def _model_error(line_no: int, code: str, what: str, models: Collection[str]) -> BatchError:
    known = ", ".join(sorted(models)) or "(none)"
    return BatchError(code=code, line=line_no, param="body.model", message=f"line {line_no}: {what}; known models: {known}")


def _bodies(source: Location) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, body) of each line that is a JSON object with an object body."""
    line_no = 0
    for line in source.iter_lines():
        if not line.strip():
            continue
        line_no += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("body"), dict):
            yield line_no, record["body"]
