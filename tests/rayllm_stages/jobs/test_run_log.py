from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.run_log import RunLog


def test_parts_commit_whole_and_merge_once(tmp_path):
    log = RunLog(Location(str(tmp_path)))
    writer = log.writer(attempt=1, commit_every_rows=2)
    writer.add_result(0, '{"a": 0}', 3, 4, 0.5)
    writer.add_error(1, '{"e": 1}', "invalid_json")
    writer.add_result(2, '{"a": 2}', 1, 1, None)
    writer.commit()
    assert log.done_indexes() == {0, 1, 2}
    assert log.next_attempt() == 2

    # A part cut short by a crash (no trailer) is discarded, its rows are not done.
    torn = log.parts.child("part-0002-000001.part")
    torn.write_text('#rayllm-part {"indexes": [3]}\nR\t{"a": 3}\n')
    assert log.done_indexes() == {0, 1, 2}
    assert not torn.exists()

    results, errors = Location(str(tmp_path / "r.jsonl")), Location(str(tmp_path / "e.jsonl"))
    stats, attempts = log.merge(results, errors)
    assert results.read_text().splitlines() == ['{"a": 0}', '{"a": 2}']
    assert errors.read_text().splitlines() == ['{"e": 1}']
    assert (stats.results, stats.errors, stats.tokens_in, stats.tokens_out) == (2, 1, 4, 5)
    assert stats.error_codes == {"invalid_json": 1}
    assert [(a["attempt"], a["rows"]) for a in attempts] == [(1, 3)]
