import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import openai_line

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.io.batch_input import Request, RowError, check_input, read_requests


def _config(path, **extra) -> BatchJobConfig:
    return BatchJobConfig(input=str(path), output="unused", model={"source": "./m"}, **extra)


def _rows(config):
    return list(read_requests(config, check_input(config)))


MALFORMED = {
    "not json": "invalid_json",
    "[1, 2]": "invalid_request",
    json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}): "missing_custom_id",
    openai_line("a", "dup"): "duplicate_custom_id",
    json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/chat/completions", "body": {}}): "unsupported_method",
    json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}): "unsupported_url",
    json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}): "empty_messages",
    json.dumps(
        {
            "custom_id": "r",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "robot", "content": "x"}]},
        }
    ): "invalid_message",
    json.dumps(
        {
            "custom_id": "i",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        }
    ): "unsupported_content",
    openai_line("t", "hot", temperature=9): "invalid_sampling",
    openai_line("mt", "x", min_tokens=4, max_tokens=1): "invalid_sampling",  # found by the property tests
    openai_line("s", "x", stream=True): "unsupported_field",
    openai_line("f", "x", tools=[]): "unsupported_field",
}


def test_every_malformed_line_becomes_one_named_error(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [openai_line("a", "Is red warm or cool?")] + list(MALFORMED) + ["", "   "]
    path.write_text("\n".join(lines) + "\n")
    rows = _rows(_config(path))
    assert len(rows) == 1 + len(MALFORMED)  # blank lines are not rows
    assert isinstance(rows[0], Request) and rows[0].key == "a"
    for row, (line, code) in zip(rows[1:], MALFORMED.items(), strict=False):
        assert isinstance(row, RowError), line
        assert row.code == code, (line, row.message)
        assert f"line {row.index + 1}" in row.message
    duplicate = next(r for r in rows if isinstance(r, RowError) and r.code == "duplicate_custom_id")
    assert "already used on line 1" in duplicate.message
    sampling = [r for r in rows if isinstance(r, RowError) and r.code == "invalid_sampling"]
    assert "body.temperature" in sampling[0].message
    assert "body: Value error, min_tokens (4) must not exceed max_tokens (1)" in sampling[1].message


def test_body_sampling_overrides_defaults(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(openai_line("a", "x", max_tokens=5, stop="END", max_completion_tokens=None, seed=3) + "\n")
    (row,) = _rows(_config(path, sampling={"temperature": 0.5, "max_tokens": 9}))
    assert row.sampling.max_tokens == 5
    assert row.sampling.temperature == 0.5
    assert row.sampling.stop == ("END",)
    assert row.sampling.seed == 3
    assert row.sampling.top_k == -1  # unset: off, never missing


def test_every_request_has_one_shape(tmp_path):
    path = tmp_path / "in.jsonl"
    parts = [{"type": "text", "text": "Is teal"}, {"type": "text", "text": "warm or cool?"}]
    lines = [
        openai_line("a", parts, max_completion_tokens=3),
        openai_line("b", "plain", top_k=4),
    ]
    path.write_text("\n".join(lines) + "\n")
    a, b = _rows(_config(path))
    assert a.messages == [{"role": "user", "content": "Is teal\nwarm or cool?"}]
    assert a.sampling.max_tokens == 3
    assert a.sampling.for_vllm().keys() == b.sampling.for_vllm().keys()


def test_table_template_fields_checked_before_any_run(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text(json.dumps({"id": 1, "text": "hello"}) + "\n")
    config = _config(path, prompt={"user": "Summarise: {{ txt }}"})
    with pytest.raises(ConfigError, match="prompt.user uses field\\(s\\) 'txt'.*its columns: id, text"):
        check_input(config)
    with pytest.raises(ConfigError, match="id_column"):
        check_input(_config(path, prompt={"user": "{{ text }}"}, id_column="key"))


def test_table_rows_render_and_fail_per_row(tmp_path):
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"id": ["x", "y", "x", None], "text": ["one", None, "three", "four"]}), path)
    config = _config(path, prompt={"system": "Be brief.", "user": "Say {{ text }}"}, id_column="id")
    rows = _rows(config)
    assert isinstance(rows[0], Request)
    assert rows[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say one"}]
    assert rows[0].row == {"id": "x", "text": "one"}
    assert rows[1].code == "missing_field" and "row 1 (y): field(s) 'text' are null" in rows[1].message
    assert rows[2].code == "duplicate_id"
    assert rows[3].code == "missing_id"


def test_template_is_sandboxed(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    config = _config(path, prompt={"user": "{{ text.__class__.__mro__ }}"})
    (row,) = _rows(config)
    assert isinstance(row, RowError) and row.code == "template_error"


def test_missing_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_input(_config(tmp_path / "nope.jsonl"))


def test_example_inputs_fit_their_configs(monkeypatch):
    from conftest import REPO

    from prefect_rayllm.rayllm_stages.config.base import load_config

    monkeypatch.chdir(REPO)
    for name, expected in (("batch-openai.yaml", "openai_batch"), ("batch-table.yaml", "jsonl")):
        assert check_input(load_config(BatchJobConfig, REPO / "examples" / name)) == expected
