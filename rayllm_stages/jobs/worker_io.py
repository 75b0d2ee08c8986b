"""Workers read the input and write the finished rows; the driver only coordinates.

    driver:  plan the shards (io.input_shards) -> scan tasks -> one repeats task (row numbers, repeated ids)
    workers: read shard -> rows (`llm.rows.ROW_SCHEMA`; an input error is a row with its error set)
             -> blocks of `block_rows` (a streaming repartition) -> the job's ray.data.llm processors
             -> `commit_block`: the block's results and errors
             written as committed run-log parts, one small summary row per block back to the driver

The driver holds the shard list, a done mask (one byte per input row) and the summaries, whatever
the input's size. A block is committed under a name made from its row indexes, so a retried
write task rewrites the same part instead of adding a second copy of its rows.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.io.batch_input import RowError
from prefect_rayllm.rayllm_stages.io.input_shards import Shard, find_repeats, plan_shards, scan_shard
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.run_log import PartWriter
from prefect_rayllm.rayllm_stages.llm.rows import failure_of, rows_table
from prefect_rayllm.rayllm_stages.runtime.engine_stats import EngineTraces

# The step name an input error carries through the pipeline (not a valid step name: no clash).
INPUT_STEP = "(input)"
LIGHT_TASK_CPUS = 0.25


@dataclass
class InputRow:
    """One input row ready for the pipeline: its columns of `llm.rows.ROW_SCHEMA` (`row_json`, and
    `usage_json` when resumed); the rest take their defaults."""

    index: int
    key: str
    columns: dict[str, Any]


@dataclass
class Finished:
    """One finished row as the run log commits it: a result line, or an error line with its code."""

    index: int
    line: str
    error_code: str | None = None  # None: a result
    failed_step: str | None = None  # where an error row failed (chains: the step; curation: the stage)
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float | None = None
    step_usage: dict[str, dict[str, int]] | None = None  # chains: tokens per step


@dataclass
class Committed:
    """One block's rows, committed by a worker: what the driver learns of them."""

    rows: int
    results: int
    errors: int
    traces: EngineTraces
    committed_at: float = 0.0  # when the worker committed the block (the manifest's timings use it)


# A job's reader: (shard, its first row index, repeated rows -> earlier row) -> the shard's rows.
ShardReader = Callable[[Shard, int, dict[int, int]], Iterator["InputRow | RowError"]]


@dataclass
class ReadPlan:
    """The shards and where each starts; `total` None: counted as read (a Parquet file, one shard)."""

    shards: list[Shard]
    first_indexes: list[int]
    total: int | None
    repeats: Any  # ObjectRef of {row index: earlier row index}, or None


def plan_reading(source: Location, key_of: Callable[[str], str | None] | None, shard_bytes: int) -> ReadPlan:
    """Shards of a JSON Lines file with their row numbers and repeated keys, found by Ray tasks
    (`key_of` None: rows have no key to repeat); a Parquet file is one shard."""
    import ray

    if source.path.endswith(".parquet"):
        return ReadPlan([Shard(source.url, source.storage_options)], [0], None, None)
    shards = plan_shards(source, shard_bytes)
    scan = ray.remote(num_cpus=LIGHT_TASK_CPUS)(scan_shard)
    scans = [scan.remote(shard, key_of or _no_key) for shard in shards]
    numbering, repeats = ray.remote(num_cpus=LIGHT_TASK_CPUS, num_returns=2)(_numbering_and_repeats).remote(*scans)
    first_indexes, total = ray.get(numbering)
    return ReadPlan(shards, first_indexes, total, repeats)


def check_nodes_see(input_file: Location, output_marker: Location) -> None:
    """On a cluster of several nodes, a local input and output must be the same files on every node
    (a shared mount): workers read the input and write the parts where they run.

    Raises:
        ConfigError: a node does not see the input (or sees another size), or not the output's
            `output_marker` file; the node is named.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not (input_file.is_local or output_marker.is_local) or not ray.is_initialized():
        return  # not yet connected: Ray Data starts a local Ray, one node
    nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU")]
    if len(nodes) <= 1:
        return
    size = input_file.size()
    probe = ray.remote(num_cpus=0)(_sizes_seen)
    answers = {
        f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(input_file, output_marker)
        for node in nodes
    }
    for address, answer in answers.items():
        seen_input, seen_output = ray.get(answer, timeout=120)
        where = "use object storage or a filesystem mounted at the same path on every node"
        if input_file.is_local and seen_input != size:
            what = "does not exist" if seen_input is None else f"has {seen_input} bytes, not {size}"
            raise ConfigError(f"input: {input_file.url} {what} on Ray node {address}; {where}")
        if output_marker.is_local and not seen_output:
            raise ConfigError(f"output: {output_marker.url} is not visible from Ray node {address}; {where}")


def read_dataset(plan: ReadPlan, reader: ShardReader, done: np.ndarray, block_rows: int):
    """A Ray Dataset of the input rows not yet done, read by workers (`llm.rows.ROW_SCHEMA`)."""
    import ray

    items = [{"shard": i} for i in range(len(plan.shards))]
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shards,  # type: ignore[arg-type]
        fn_kwargs={"plan": plan, "reader": reader, "done": ray.put(done), "block_rows": block_rows},
        batch_size=1,
        batch_format="numpy",
        num_cpus=LIGHT_TASK_CPUS,
    )
    # Ray Data joins what one task yields into blocks of up to 128 MiB: a shard would reach the
    # engines as one block (one engine, no results until all of it is done). Cut it back, streaming.
    return rows.repartition(target_num_rows_per_block=block_rows)


def any_runnable(plan: ReadPlan, reader: ShardReader, done: np.ndarray) -> bool:
    """Whether any row not yet done can run (is not an input error). Read in the driver up to the
    first such row, skipping shards that are done: at once for a usual input; the rest of the
    input only when nothing is left to run."""
    import ray

    earlier = ray.get(plan.repeats) if plan.repeats is not None else {}
    ends = [*plan.first_indexes[1:], plan.total]
    for shard, first_index, end in zip(plan.shards, plan.first_indexes, ends, strict=True):
        if end is not None and done[first_index:end].all():
            continue  # a resumed run: no need to read shards that are done
        for item in reader(shard, first_index, earlier):
            if not isinstance(item, RowError) and not (item.index < len(done) and done[item.index]):
                return True
    return False


def commit_blocks(
    dataset, folder: Location, attempt: int, finish: Callable[[dict[str, Any]], Finished], commit_every: int, started_at: float
):
    """`dataset` with each block's rows committed as run-log parts by the worker that holds it; one
    summary row per block (`Committed`, pickled) comes out. `started_at`: when the attempt started
    (the parts' attempt span, hence the manifest's timings, runs from there)."""
    return dataset.map_batches(
        _commit_block,
        fn_kwargs={
            "folder": folder.url,
            "storage_options": folder.storage_options,
            "attempt": attempt,
            "finish": finish,
            "commit_every": commit_every,
            "started_at": started_at,
        },
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        num_cpus=LIGHT_TASK_CPUS,
    )


def committed_of(summary: dict[str, Any]) -> Committed:
    return pickle.loads(summary["committed"])


def run_on_a_worker(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in one Ray task when Ray is up, so what it reads (a run log's rows) stays on
    a worker and only its answer reaches this process; here when Ray is not up."""
    import ray

    if not ray.is_initialized():
        return function(*args)
    task = ray.remote(num_cpus=LIGHT_TASK_CPUS, max_retries=0)(function)
    return ray.get(task.remote(*args))


def input_error_row(problem: RowError) -> InputRow:
    """An input error as a pipeline row: its error set, so every stage passes it on untouched."""
    error = {"code": problem.code, "message": problem.message, "step": INPUT_STEP}
    payload = json.dumps({"raw": problem.raw}) if problem.raw is not None else "{}"
    return InputRow(problem.index, problem.key or "", {"row_json": payload, "row_error": error})


def input_error_of(row: dict[str, Any]) -> RowError | None:
    """The input error a pipeline row carries (None: it is not one)."""
    failure = failure_of(row)
    if failure is None or failure.step != INPUT_STEP:
        return None
    raw = json.loads(row.get("row_json") or "{}").get("raw")
    return RowError(int(row["row_index"]), row["row_key"] or None, failure.code, failure.message, raw)


def to_table(rows: list[InputRow]):
    """One input block, of the declared row schema, whatever its rows hold."""
    return rows_table({"row_index": r.index, "row_key": r.key, **r.columns} for r in rows)


def _sizes_seen(input_file: Location, output_marker: Location) -> tuple[int | None, bool]:
    return (input_file.size() if input_file.exists() else None), output_marker.exists()


def _no_key(line: str) -> None:
    return None


def _numbering_and_repeats(*scans) -> tuple[tuple[list[int], int], dict[int, int]]:
    repeats = find_repeats(scans)
    return (repeats.first_indexes, repeats.total), repeats.earlier


def _read_shards(batch: dict[str, np.ndarray], plan: ReadPlan, reader: ShardReader, done: Any, block_rows: int):
    import ray

    done_mask = ray.get(done)
    earlier = ray.get(plan.repeats) if plan.repeats is not None else {}
    for shard_number in batch["shard"]:
        position = int(shard_number)
        rows: list[InputRow] = []
        for item in reader(plan.shards[position], plan.first_indexes[position], earlier):
            if item.index < len(done_mask) and done_mask[item.index]:
                continue
            rows.append(input_error_row(item) if isinstance(item, RowError) else item)
            if len(rows) >= block_rows:
                yield to_table(rows)
                rows = []
        if rows:
            yield to_table(rows)


def _commit_block(
    batch, folder: str, storage_options: dict[str, Any], attempt: int, finish, commit_every: int, started_at: float | None = None
):
    import pyarrow as pa

    rows = batch.to_pylist()
    traces = EngineTraces()
    results = errors = 0
    if rows:
        token = hashlib.blake2b(",".join(str(r["row_index"]) for r in rows).encode(), digest_size=8).hexdigest()
        writer = PartWriter(Location(folder, storage_options), attempt, commit_every, token=token, started_at=started_at)
        for row in rows:
            traces.observe(row.get("usage_json"))
            done = finish(row)
            if done.error_code is None:
                writer.add_result(done.index, done.line, done.tokens_in, done.tokens_out, done.latency_s, done.step_usage)
                results += 1
            else:
                writer.add_error(done.index, done.line, done.error_code, done.failed_step, done.step_usage)
                errors += 1
        writer.commit()
    summary = Committed(len(rows), results, errors, traces, time.time())
    return pa.table({"committed": pa.array([pickle.dumps(summary)], pa.binary())})
