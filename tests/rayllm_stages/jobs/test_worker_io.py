"""What workers do with rows (rayllm_stages.jobs.worker_io): an input error travels as a row of the
row contract and is written exactly as the driver wrote it before; a committed block's summary."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.io.batch_output import OpenAIBatchFormat, TableFormat
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.lifecycle import RowFinisher
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog
from prefect_rayllm.rayllm_stages.jobs.worker_io import _commit_block, committed_of, input_error_of, input_error_row, to_table

ERRORS = st.builds(
    RowError,
    index=st.integers(0, 10**9),
    key=st.one_of(st.none(), st.text(min_size=1)),
    code=st.sampled_from(["invalid_json", "duplicate_custom_id", "missing_id", "invalid_encoding"]),
    message=st.text(),
    raw=st.one_of(st.none(), st.text()),
)


@given(problem=ERRORS)
def test_an_input_error_crosses_the_pipeline_unchanged(problem):
    (row,) = to_table([input_error_row(problem)]).to_pylist()
    assert input_error_of(row) == problem
    for formatter in (OpenAIBatchFormat("m", run_key="out/"), TableFormat()):
        finished = RowFinisher(formatter)(row)
        assert (finished.line, finished.error_code) == (formatter.input_error(problem), problem.code)


def test_a_block_is_committed_as_a_part_once_whatever_the_retries(tmp_path):
    """A retried write task (same block) rewrites its part: the rows are in the run log once."""
    problems = [RowError(i, f"k{i}", "invalid_json", f"line {i + 1}: not valid JSON") for i in (3, 5, 8)]
    block = to_table([input_error_row(p) for p in problems])
    log = RunLog(Location(str(tmp_path)))
    finish = RowFinisher(TableFormat())
    for _ in range(2):
        summary = _commit_block(block, log.parts.url, {}, attempt=1, finish=finish, commit_every=1000)
    committed = committed_of(summary.to_pylist()[0])
    assert (committed.rows, committed.results, committed.errors) == (3, 0, 3)
    assert sorted(log.done_mask(10).nonzero()[0].tolist()) == [3, 5, 8]
    stats, _ = log.merge(Location(str(tmp_path / "r.jsonl")), Location(str(tmp_path / "e.jsonl")))
    assert stats.errors == 3
    assert [json.loads(line)["row_index"] for line in (tmp_path / "e.jsonl").read_text().splitlines()] == [3, 5, 8]
