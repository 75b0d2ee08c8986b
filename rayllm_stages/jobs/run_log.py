"""The run log: committed part files under `<output>/_rayllm/`, which make a job resumable.

Each part holds up to `commit_every_rows` finished rows (results and errors). A part is written whole
and ends with an `#end` line; a part cut short by a crash lacks it and is discarded, so a crash loses
at most one part's rows, which the rerun computes again. Finishing a job merges the parts into
`results.jsonl` and `errors.jsonl` and removes them.

Part file layout:
    #rayllm-part {"indexes": [...], "results": 2, "errors": 1, "tokens_in": .., ...}
    R\t{...result line...}
    E\t{...error line...}
    #end
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect_rayllm.rayllm_stages.io.storage import Location

HEADER = "#rayllm-part "
TRAILER = "#end"
RESULT, ERROR = "R", "E"


@dataclass
class PartStats:
    """What one part (or, summed, a whole run) holds."""

    indexes: list[int] = field(default_factory=list)
    results: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: list[float] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)  # chains: rows/errors/tokens per step
    attempt: int = 0
    attempt_started_at: float | None = None
    last_written_at: float | None = None

    def absorb(self, other: PartStats, keep_rows: bool = True) -> None:
        """Add `other`'s counts; `keep_rows`: its row indexes and latencies too (lists that grow with
        the rows: a merge of a large run keeps them in compact arrays of its own instead)."""
        if keep_rows:
            self.indexes.extend(other.indexes)
            self.latencies.extend(other.latencies)
        self.results += other.results
        self.errors += other.errors
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        for code, count in other.error_codes.items():
            self.error_codes[code] = self.error_codes.get(code, 0) + count
        for name, counts in other.steps.items():
            mine = self.steps.setdefault(name, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value

    def count_step(self, name: str, **values: int) -> None:
        mine = self.steps.setdefault(name, {"rows": 0, "errors": 0, "tokens_in": 0, "tokens_out": 0})
        for key, value in values.items():
            mine[key] += value


class RunLog:
    """The `_rayllm/` folder of one output location."""

    def __init__(self, output: Location):
        self.root = output.child("_rayllm")
        self.parts = self.root.child("parts")
        self.job_file = self.root.child("job.json")
        self.engines_file = self.root.child("engines.json")

    def record_engine(self, engine: dict[str, Any]) -> None:
        """Note a Serve-hosted engine an attempt used (written once per engine and attempt)."""
        self.engines_file.write_json([*self.read_engines(), engine])

    def read_engines(self) -> list[dict[str, Any]]:
        return self.engines_file.read_json() if self.engines_file.exists() else []

    def read_job(self) -> dict[str, Any] | None:
        return self.job_file.read_json() if self.job_file.exists() else None

    def write_job(self, job: dict[str, Any]) -> None:
        self.job_file.write_json(job)

    def complete_parts(self) -> list[tuple[Location, PartStats]]:
        """Parts written whole, in write order; a part cut short by a crash is deleted."""
        found = []
        for part in self.parts.list_files(".part"):
            stats = _read_header_if_complete(part)
            if stats is None:
                part.remove()
            else:
                found.append((part, stats))
        return found

    def committed_stats(self) -> PartStats:
        """What the whole parts hold, summed (counts only, no row indexes). Read only: a part being written (or cut short) is
        skipped, never deleted, so another process may call this while the job runs."""
        total = PartStats()
        for part in self.parts.list_files(".part"):
            stats = _read_header_if_complete(part)
            if stats is not None:
                total.absorb(stats, keep_rows=False)
        return total

    def done_indexes(self) -> set[int]:
        done: set[int] = set()
        for _, stats in self.complete_parts():
            done.update(stats.indexes)
        return done

    def done_mask(self, total: int):
        """One bool per input row (numpy): True where a whole part holds it. A byte a row, so a
        resumed job's driver stays small whatever the input's size."""
        import numpy as np

        mask = np.zeros(total, dtype=bool)
        for _, stats in self.complete_parts():
            mask[stats.indexes] = True
        return mask

    def next_attempt(self) -> int:
        names = [p.path.rsplit("/", 1)[-1] for p in self.parts.list_files(".part")]
        return 1 + max((int(n.split("-")[1]) for n in names), default=0)

    def writer(self, attempt: int, commit_every_rows: int) -> PartWriter:
        return PartWriter(self.parts, attempt, commit_every_rows)

    def merge(self, results: Location, errors: Location) -> tuple[PartStats, list[dict[str, float]]]:
        """Write all parts into the final results and errors files.

        Memory stays small whatever the size: one byte per row marks the rows seen, latencies are
        kept as an array of doubles, and parts are streamed line by line.

        Returns:
            The parts' summed stats (without row indexes), and per attempt its rows and the seconds
            until its last commit.
        """
        import numpy as np

        total = PartStats()
        latencies = array("d")
        parts = self.complete_parts()
        seen = np.zeros(1 + max((max(stats.indexes) for _, stats in parts if stats.indexes), default=-1), dtype=bool)
        attempts = summarize_attempts(stats for _, stats in parts)
        with results.open("w", encoding="utf-8") as out, errors.open("w", encoding="utf-8") as err:
            for part, stats in parts:
                indexes = np.asarray(stats.indexes, dtype=np.int64)
                if seen[indexes].any() or np.unique(indexes).size != indexes.size:
                    raise RuntimeError(f"run log part {part} repeats rows already in an earlier part")
                seen[indexes] = True
                total.absorb(stats, keep_rows=False)
                latencies.extend(stats.latencies)
                for kind, line in part_lines(part):
                    (out if kind == RESULT else err).write(line + "\n")
        total.latencies = latencies  # type: ignore[assignment]  # a compact sequence of floats
        return total, attempts

    def attempts(self) -> list[dict[str, float]]:
        """Per attempt: the rows its complete parts hold and the seconds from its start to its last commit."""
        return summarize_attempts(stats for _, stats in self.complete_parts())

    def clear_parts(self) -> None:
        self.parts.remove()

    def clear(self) -> None:
        self.root.remove()


class PartWriter:
    """Buffers finished rows and commits them as whole part files."""

    def __init__(self, folder: Location, attempt: int, commit_every_rows: int, token: str = "", started_at: float | None = None):
        self.folder = folder
        self.attempt = attempt
        self.token = f"{token}-" if token else ""  # writers working at once need distinct names
        self.commit_every_rows = commit_every_rows
        self.sequence = 0
        self.started_at = started_at or time.time()  # the attempt's start (workers' writers: given)
        self._reset()

    def _reset(self) -> None:
        self.lines: list[str] = []
        self.stats = PartStats(attempt=self.attempt)

    def add_result(
        self,
        index: int,
        line: str,
        tokens_in: int,
        tokens_out: int,
        latency: float | None,
        steps: dict[str, dict[str, int]] | None = None,
    ) -> None:
        for name, usage in (steps or {}).items():
            self.stats.count_step(name, rows=1, tokens_in=usage["in"], tokens_out=usage["out"])
        self.stats.results += 1
        self.stats.tokens_in += tokens_in
        self.stats.tokens_out += tokens_out
        if latency is not None:
            self.stats.latencies.append(round(latency, 6))
        self._add(RESULT, index, line)

    def add_error(
        self, index: int, line: str, code: str, step: str | None = None, steps: dict[str, dict[str, int]] | None = None
    ) -> None:
        """`step`: where the row failed; `steps`: the usage of the steps it finished before that."""
        for name, usage in (steps or {}).items():
            if name != step:
                self.stats.count_step(name, rows=1, tokens_in=usage["in"], tokens_out=usage["out"])
        if step:
            self.stats.count_step(step, errors=1)
        self.stats.errors += 1
        self.stats.error_codes[code] = self.stats.error_codes.get(code, 0) + 1
        self._add(ERROR, index, line)

    def _add(self, kind: str, index: int, line: str) -> None:
        self.stats.indexes.append(index)
        self.lines.append(f"{kind}\t{line}")
        if len(self.lines) >= self.commit_every_rows:
            self.commit()

    def commit(self) -> None:
        if not self.lines:
            return
        self.sequence += 1
        self.stats.attempt_started_at = self.started_at
        self.stats.last_written_at = time.time()
        part = self.folder.child(f"part-{self.attempt:04d}-{self.token}{self.sequence:06d}.part")
        with part.open("w", encoding="utf-8") as handle:
            handle.write(HEADER + json.dumps(asdict(self.stats)) + "\n")
            handle.write("\n".join(self.lines) + "\n")
            handle.write(TRAILER + "\n")
        self._reset()


def _read_header_if_complete(part: Location) -> PartStats | None:
    try:
        with part.open("rb") as handle:
            first = handle.readline().decode("utf-8")
            size = part.size()
            handle.seek(max(0, size - len(TRAILER) - 2))
            tail = handle.read().decode("utf-8", errors="replace")
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith(HEADER) or not tail.rstrip("\n").endswith(TRAILER):
        return None
    return PartStats(**json.loads(first[len(HEADER) :]))


def summarize_attempts(parts: Iterable[PartStats]) -> list[dict[str, float]]:
    """Per attempt: rows in its parts, and seconds from its start to its last commit."""
    spans: dict[int, tuple[float, float]] = {}
    rows: dict[int, int] = {}
    for stats in parts:
        rows[stats.attempt] = rows.get(stats.attempt, 0) + len(stats.indexes)
        if stats.attempt_started_at is not None and stats.last_written_at is not None:
            start, end = spans.get(stats.attempt, (stats.attempt_started_at, stats.last_written_at))
            spans[stats.attempt] = (min(start, stats.attempt_started_at), max(end, stats.last_written_at))
    return [
        {"attempt": a, "rows": rows[a], "seconds": round(spans[a][1] - spans[a][0], 3) if a in spans else 0.0}
        for a in sorted(rows)
    ]


def read_part(part: Location):
    """The JSON records of a part's result lines."""
    for kind, line in part_lines(part):
        if kind == RESULT:
            yield json.loads(line)


def part_lines(part: Location) -> Iterator[tuple[str, str]]:
    """A part's lines as (kind, line): kind `R` for a result, `E` for an error."""
    for raw in part.iter_lines():
        if raw.startswith("#"):
            continue
        kind, line = raw.rstrip("\n").split("\t", 1)
        yield kind, line
