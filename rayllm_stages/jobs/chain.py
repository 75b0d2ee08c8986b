"""Multi-model chains: each step is its own `ray.data.llm` processor, composed into one lazy Ray
Data pipeline, so rows flow into step 2 while step 1 is still running.

    table rows -> [step 1 processor] -> save step 1 outputs -> [step 2 processor] -> ... -> results
                                                   ^ rows resumed after step 1 join here

A row that fails at step k (template field null, engine error, reply not matching the schema) is
written to the errors file with the step's name and does not reach step k+1. Each step's outputs
are saved as they stream by, so a rerun after a crash in step 2 starts those rows at step 2.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import ChainJobConfig
from prefect_rayllm.rayllm_stages.io.batch_input import (
    RowError,
    check_table_input,
    count_rows,
    keyed_row,
    keyed_table_rows,
    table_columns,
    table_key,
    table_record,
)
from prefect_rayllm.rayllm_stages.io.batch_output import ROW_ID_FIELD, TableFormat, json_line
from prefect_rayllm.rayllm_stages.io.input_shards import Shard, shard_lines
from prefect_rayllm.rayllm_stages.io.storage import Location
from prefect_rayllm.rayllm_stages.jobs.lifecycle import InputRow, LLMJob, RowFinisher
from prefect_rayllm.rayllm_stages.jobs.run_log import PartWriter, RunLog, read_part
from prefect_rayllm.rayllm_stages.jobs.worker_io import to_table
from prefect_rayllm.rayllm_stages.llm.engines import LIGHT_MAP_KWARGS, cpu_core_sets
from prefect_rayllm.rayllm_stages.llm.prompts import template_fields
from prefect_rayllm.rayllm_stages.llm.rows import EngineSampling, RowFailure, failure_of
from prefect_rayllm.rayllm_stages.llm.steps import LLMStep, TemplateStep


def check_chain_fields(config: ChainJobConfig, columns: list[str]) -> None:
    """Each step may read input columns and earlier steps' outputs only; say which step and field."""
    produced_by = {step.output_column: (i, step.name) for i, step in enumerate(config.steps)}
    clashes = sorted(set(produced_by) & set(columns))
    if clashes:
        raise ConfigError(f"output_column(s) {', '.join(map(repr, clashes))} already exist in {config.input}; choose other names")
    available = set(columns)
    for position, step in enumerate(config.steps):
        for part, fields in template_fields(step.prompt).items():
            for field in sorted(fields - available):
                where = f"steps[{position}] ({step.name}).prompt.{part}"
                if field in produced_by:
                    later_position, later = produced_by[field]
                    raise ConfigError(
                        f"{where} uses {field!r}, which step {later!r} (steps[{later_position}]) produces only later"
                    )
                raise ConfigError(
                    f"{where} uses field {field!r} that neither the input nor an earlier step produces "
                    f"(available: {', '.join(sorted(available))})"
                )
        available.add(step.output_column)


class ChainFormat(TableFormat):
    """Results: input columns, every step's output column, `_usage` per step, and `_row_id` (the id
    column's value, or the input row number: results come in completion order, not input order).
    Errors: the row, the step it failed in, and why."""

    def result(self, row: dict[str, Any]) -> str:
        record = json.loads(row["row_json"])
        record["_usage"] = json.loads(row.get("usage_json") or "{}")
        record[ROW_ID_FIELD] = row["row_key"]
        return json_line(record)

    def engine_error(self, row: dict[str, Any], failure: RowFailure) -> tuple[str, str]:
        message = f"row {row['row_index']} ({row['row_key']}): step {failure.step}: {failure.message}"
        line = {
            "row_index": row["row_index"],
            "row_id": row["row_key"],
            "failed_step": failure.step,
            "error": {"code": failure.code, "message": message},
        }
        return json_line(line), failure.code


class ChainJob(LLMJob):
    """One chain run bound to its output location (the lifecycle of `ResumableJob`, rows as in `LLMJob`)."""

    kind = "chain"
    config: ChainJobConfig

    def __init__(self, config: ChainJobConfig, *, api_keys: dict[str, str | None] | None = None):
        super().__init__(config)
        self.api_keys = api_keys or {}
        self.steps: list[LLMStep] = [
            TemplateStep(s.name, s.prompt, EngineSampling.from_params(s.sampling), s.output_column, s.parse, s.json_schema)
            for s in config.steps
        ]
        self._resume_points: dict[int, tuple[int, InputRow]] | None = None

    def check_input(self) -> str:
        input_format = check_table_input(self.config)
        check_chain_fields(self.config, table_columns(Location(self.config.input, self.config.storage_options), input_format))
        return input_format

    def count_rows(self, input_format: str) -> int:
        return count_rows(self.config, input_format)

    def engine_batch_size(self) -> int:
        return min(s.model.batch_size for s in self.config.steps)

    def finisher(self, input_format: str) -> RowFinisher:
        return RowFinisher(ChainFormat(), per_step=True)

    def shard_reader(self, input_format: str) -> ChainRows:
        return ChainRows(self.config, input_format)

    def row_key_of(self, input_format: str) -> Callable[[str], str | None] | None:
        return functools.partial(table_key, id_column=self.config.id_column) if self.config.id_column else None

    def resume_points(self) -> dict[int, tuple[int, InputRow]]:
        """Rows whose output of some step is saved but which are not finished: index -> (next step, row)."""
        if self._resume_points is None:
            done = self.log.done_indexes()
            points: dict[int, tuple[int, InputRow]] = {}
            for position in range(len(self.steps) - 2, -1, -1):
                for saved in self._step_log(position).complete_parts():
                    for record in read_part(saved[0]):
                        index = record["row_index"]
                        if index not in done and index not in points:
                            points[index] = (
                                position + 1,
                                InputRow(
                                    index, record["row_key"], {"row_json": record["row_json"], "usage_json": record["usage_json"]}
                                ),
                            )
            self._resume_points = points
        return self._resume_points

    def resumed_rows(self) -> set[int]:
        return set(self.resume_points())

    def pipeline(self, dataset: Any, attempt: int):
        import ray

        by_step: dict[int, list[InputRow]] = {}
        for next_step, row in self.resume_points().values():
            by_step.setdefault(next_step, []).append(row)
        last = len(self.steps) - 1
        in_process = [i for i, s in enumerate(self.config.steps) if s.model.engine == "vllm"]
        core_sets = dict(zip(in_process, cpu_core_sets(len(in_process)) or [], strict=False))
        for position, (spec, step) in enumerate(zip(self.config.steps, self.steps, strict=False)):
            if by_step.get(position):
                joining = ray.data.from_arrow(to_table(by_step[position]))
                dataset = joining if dataset is None else dataset.union(joining)
            if dataset is None:
                continue
            processor = self.processor_for(
                spec.model, step, api_key=self.api_keys.get(step.name), cpu_cores=core_sets.get(position)
            )
            dataset = processor(dataset)
            if position < last:
                dataset = dataset.map_batches(
                    save_step_outputs,
                    fn_kwargs={
                        "folder": self._step_log(position).parts.url,
                        "storage_options": self.config.storage_options,
                        "attempt": attempt,
                    },
                    batch_format="pyarrow",
                    batch_size=None,
                    zero_copy_batch=True,
                    **LIGHT_MAP_KWARGS,
                )
        return dataset

    def step_summaries(self, stats) -> list[dict[str, Any]]:
        summaries = []
        for spec in self.config.steps:
            counts = stats.steps.get(spec.name, {})
            summaries.append(
                {
                    "name": spec.name,
                    "source": spec.model.source,
                    "rows": counts.get("rows", 0),
                    "errors": counts.get("errors", 0),
                    "tokens_in": counts.get("tokens_in", 0),
                    "tokens_out": counts.get("tokens_out", 0),
                }
            )
        return summaries

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "model": {"steps": [{"name": s.name, "source": s.model.source, "engine": s.model.engine} for s in self.config.steps]},
            "sampling": {s.name: s.sampling.model_dump() for s in self.config.steps},
            "prompt_template_hash": ",".join(s.prompt.digest() for s in self.config.steps),
        }

    def _step_log(self, position: int) -> RunLog:
        return RunLog(self.output.child("_rayllm", "steps", f"{position}-{self.steps[position].name}"))

    def after_finalize(self) -> None:
        super().after_finalize()
        self.output.child("_rayllm", "steps").remove()


class ChainRows:
    """A shard's input rows with their ids, as pipeline rows (picklable: the workers that read run it)."""

    def __init__(self, config: ChainJobConfig, input_format: str):
        self.config, self.input_format = config, input_format

    def __call__(self, shard: Shard, first_index: int, earlier: dict[int, int]) -> Iterator[InputRow | RowError]:
        for item in self._keyed(shard, first_index, earlier):
            yield item if isinstance(item, RowError) else _chain_row(*item)

    def _keyed(self, shard: Shard, first_index: int, earlier: dict[int, int]):
        id_column = self.config.id_column
        if self.input_format == "parquet":
            yield from keyed_table_rows(shard.location, "parquet", id_column)  # one shard, read in order
            return
        for index, line in shard_lines(shard, first_index):
            record = table_record(index, line)
            yield record if isinstance(record, RowError) else keyed_row(index, record, id_column, earlier.get(index))


def _chain_row(index: int, key: str, row: dict[str, Any]) -> InputRow:
    return InputRow(index, key, {"row_json": json.dumps(row, ensure_ascii=False, default=str), "usage_json": "{}"})


def save_step_outputs(batch, folder: str, storage_options: dict[str, Any], attempt: int):
    """Ray Data map (pyarrow batches of `llm.rows.ROW_SCHEMA`): commit this batch's successful
    rows of a step, then pass the batch on unchanged."""
    writer = PartWriter(Location(folder, storage_options), attempt, commit_every_rows=1 << 30, token=uuid.uuid4().hex[:12])
    for record in batch.to_pylist():
        if failure_of(record) is not None:
            continue
        line = json.dumps({name: record[name] for name in ("row_index", "row_key", "row_json", "usage_json")}, default=str)
        writer.add_result(int(record["row_index"]), line, 0, 0, None)
    writer.commit()
    return batch
