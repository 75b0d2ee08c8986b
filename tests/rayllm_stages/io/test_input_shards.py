"""Shards read in parallel give the rows, row numbers and repeated ids of one top-to-bottom read,
wherever the cuts fall (the invariant the workers' reading rests on)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_rayllm.rayllm_stages.io.batch_input import _non_blank_lines, batch_key
from prefect_rayllm.rayllm_stages.io.input_shards import find_repeats, plan_shards, scan_shard, shard_lines
from prefect_rayllm.rayllm_stages.io.storage import Location

LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
IDS = st.sampled_from(["a", "b", "c", "ü", "d e"])
LINES = st.one_of(
    st.builds(lambda key: f'{{"custom_id": "{key}", "body": {{}}}}', IDS),
    st.sampled_from(["", "   ", "\u3000", "\x1c", "not json", "[1, 2]", '{"custom_id": ""}', "\u00e9t\u00e9"]),
)


def sequential(location: Location) -> tuple[list[tuple[int, str]], dict[int, int]]:
    """Rows and repeated ids as the sequential reader sees them."""
    rows, seen, earlier = [], {}, {}
    for index, line in enumerate(_non_blank_lines(location)):
        rows.append((index, line.rstrip("\n")))
        key = batch_key(line)
        if key is not None:
            if key in seen:
                earlier[index] = seen[key]
            else:
                seen[key] = index
    return rows, earlier


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.tuples(LINES, LINE_ENDS), max_size=30), last_end=st.booleans(), shard_bytes=st.integers(1, 64))
def test_shards_read_like_one_sequential_pass(tmp_path_factory, lines, last_end, shard_bytes):
    text = "".join(line + end for line, end in lines)
    if not last_end and text:
        text = text.rstrip("\r\n") or text
    path = Path(tmp_path_factory.mktemp("shards")) / "input.jsonl"
    path.write_bytes(text.encode("utf-8"))
    location = Location(str(path))
    expected_rows, expected_earlier = sequential(location)

    shards = plan_shards(location, shard_bytes)
    repeats = find_repeats([scan_shard(shard, batch_key) for shard in shards])
    rows = [
        (index, (line or "").rstrip("\n"))
        for shard, first in zip(shards, repeats.first_indexes, strict=True)
        for index, line in shard_lines(shard, first)
    ]
    assert rows == expected_rows
    assert repeats.total == len(expected_rows)
    assert repeats.earlier == expected_earlier


def test_a_line_that_is_not_utf8_is_a_row_of_its_own(tmp_path):
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n{"b": 2}\n')
    assert [(i, line) for i, line in shard_lines(plan_shards(Location(str(path)), 5)[0])] == [(0, '{"a": 1}\n')]
    rows = [row for shard in plan_shards(Location(str(path)), 5) for row in shard_lines(shard)]
    assert [line for _, line in rows] == ['{"a": 1}\n', None, '{"b": 2}\n']
