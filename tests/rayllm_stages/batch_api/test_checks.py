"""An uploaded file checked for a batch: `rayllm batch`'s line checks plus one configured model."""

from __future__ import annotations

import json

from conftest import openai_line

from prefect_rayllm.rayllm_stages.batch_api.checks import check_batch_file

MODELS = ("tiny", "tiny-bad")


def _write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_good_file_names_its_model_and_counts_its_requests(tmp_path):
    url = _write(tmp_path, [openai_line(f"r{i}", "Is red warm or cool?") for i in range(3)] + [""])
    checked = check_batch_file(url, MODELS)
    assert checked.ok and (checked.model, checked.requests) == ("tiny", 3)


def test_every_bad_line_is_named_with_its_number(tmp_path):
    lines = [
        openai_line("r1", "Hi"),
        "this is not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", "messages": []}}),
        openai_line("r1", "again"),  # duplicate custom_id
        openai_line("r4", "Hi", model="gpt-4o"),
        openai_line("r5", "Hi", model="tiny-bad"),  # another configured model than line 1's
        json.dumps({"custom_id": "r6", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny", "input": "x"}}),
        openai_line("r7", "Hi", logprobs=True),
        json.dumps(
            {
                "custom_id": "r8",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "Hi"}]},
            }
        ),
    ]
    checked = check_batch_file(_write(tmp_path, lines), MODELS)
    assert not checked.ok and checked.requests == len(lines)
    by_line = {e.line: e for e in checked.errors}
    assert {line: e.code for line, e in by_line.items()} == {
        2: "invalid_json",
        3: "missing_custom_id",
        4: "duplicate_custom_id",
        5: "model_not_found",
        6: "mismatched_model",
        7: "unsupported_url",
        8: "unsupported_field",
        9: "missing_required_parameter",
    }
    for line, error in by_line.items():
        assert error.message.startswith(f"line {line}"), error.message
    assert by_line[5].message == "line 5: body.model 'gpt-4o' is not served here; known models: tiny, tiny-bad"
    assert by_line[5].param == "body.model"
    assert "differs from 'tiny' on line 1" in by_line[6].message


def test_an_empty_file_is_refused(tmp_path):
    checked = check_batch_file(_write(tmp_path, ["", "  "]), MODELS)
    assert [e.code for e in checked.errors] == ["empty_file"]


def test_the_error_list_is_capped_with_the_total_named(tmp_path):
    checked = check_batch_file(_write(tmp_path, ["nope"] * 7), MODELS, max_errors=3)
    assert [e.line for e in checked.errors[:3]] == [1, 2, 3]
    assert checked.errors[-1].code == "too_many_errors" and "7 lines are bad" in checked.errors[-1].message
    assert checked.bad_lines == 7
