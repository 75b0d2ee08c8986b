"""Output lines: one record per line for any line reader, the OpenAI Batch shape, errors naming their line."""

from __future__ import annotations

import json

from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.io.batch_output import OpenAIBatchFormat, TableFormat, json_line
from prefect_rayllm.rayllm_stages.llm.rows import EngineSampling, RowFailure, StageRow


def test_a_record_stays_on_one_line_for_any_line_reader():
    record = {"text": "a\u0085b\u2028c\u2029d\ne\rf\x1cg\x0bh", "emoji": "🙂 naïve"}
    line = json_line(record)
    assert len(line.splitlines()) == 1 and json.loads(line) == record
    assert "🙂 naïve" in line  # non-ASCII text stays readable


def _row(**extra) -> dict:
    payload = {
        "messages": [{"role": "user", "content": "hi\u2028"}],
        "sampling": EngineSampling(max_tokens=4).model_dump(),
        "row": None,
    }
    return {**StageRow(row_index=6, row_key="k\u0085", row_json=json.dumps(payload)).model_dump(), **extra}


def test_openai_batch_lines():
    out = OpenAIBatchFormat("tiny", run_key="run")
    result = json.loads(out.result(_row(generated_text="warm\u2029", num_input_tokens=5, num_generated_tokens=4)))
    assert result["custom_id"] == "k\u0085" and result["error"] is None
    body = result["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["total_tokens"] == 9
    line, code = out.engine_error(_row(), RowFailure(code="prompt_too_long", message="too long (limit 256)", step="batch"))
    error = json.loads(line)
    assert code == "prompt_too_long" and error["error"]["line"] == 7
    assert error["error"]["message"] == "line 7 (k\u0085): too long (limit 256)" and error["response"]["status_code"] == 400
    unreadable = json.loads(out.input_error(RowError(2, None, "invalid_json", "line 3: not valid JSON", raw="{\u2028")))
    assert unreadable["error"] == {"code": "invalid_json", "message": "line 3: not valid JSON", "line": 3, "raw": "{\u2028"}
    for text in (out.result(_row(generated_text="x\u2028")), line):
        assert len(text.splitlines()) == 1


def test_table_lines():
    line, code = TableFormat().engine_error(_row(), RowFailure(code="step_error", message="field 'x' is null", step="batch"))
    assert code == "step_error" and json.loads(line)["error"]["message"] == "row 6 (k\u0085): field 'x' is null"
