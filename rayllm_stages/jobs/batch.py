"""Batch inference without Prefect: an OpenAI Batch file or a table through one model.

    input shards --(read by workers: rows checked, done rows skipped)--> Ray Dataset (llm.rows.ROW_SCHEMA;
      row_json: the request) --> ray.data.llm processor (vLLM or HTTP) --> parts committed by workers
      --> finalize: results.jsonl + errors.jsonl + manifest.json

Example:
    >>> job = BatchJob(BatchJobConfig(input="requests.jsonl", output="out/", model={"source": "./tiny"}))
    >>> job.prepare()
    >>> job.execute()
    >>> manifest = job.finalize()
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.io.batch_input import (
    Request,
    RowError,
    TableRequests,
    batch_key,
    batch_line,
    check_input,
    count_rows,
    keyed_row,
    read_requests,
    table_key,
    table_record,
)
from prefect_rayllm.rayllm_stages.io.batch_output import OpenAIBatchFormat, TableFormat
from prefect_rayllm.rayllm_stages.io.input_shards import Shard, shard_lines
from prefect_rayllm.rayllm_stages.jobs.lifecycle import (
    Execution,
    InputRow,
    LLMJob,
    Preparation,
    ResumeRefused,
    RowFinisher,
)

__all__ = ["BatchJob", "Execution", "Preparation", "ResumeRefused"]


class BatchJob(LLMJob):
    """One batch job bound to its output location (the lifecycle of `ResumableJob`, rows as in `LLMJob`)."""

    kind = "batch"
    config: BatchJobConfig

    def check_input(self) -> str:
        return check_input(self.config)

    def count_rows(self, input_format: str) -> int:
        return count_rows(self.config, input_format)

    def engine_batch_size(self) -> int:
        return self.config.model.batch_size

    def shard_reader(self, input_format: str) -> BatchRows:
        return BatchRows(self.config, input_format)

    def row_key_of(self, input_format: str) -> Callable[[str], str | None] | None:
        if input_format == "openai_batch":
            return batch_key
        return functools.partial(table_key, id_column=self.config.id_column) if self.config.id_column else None

    def pipeline(self, dataset: Any, attempt: int):
        return self.processor_for(self.config.model, api_key=self.api_key)(dataset)

    def finisher(self, input_format: str) -> RowFinisher:
        if input_format == "openai_batch":
            return RowFinisher(OpenAIBatchFormat(self.config.model.served_name, run_key=self.config.output))
        return RowFinisher(TableFormat())

    def manifest_fields(self) -> dict[str, Any]:
        model = self.config.model
        return {
            "model": {
                "name": model.served_name,
                "source": model.source,
                "engine": model.engine,
                "engine_kwargs": model.engine_kwargs,
                "concurrency": model.concurrency,
                "batch_size": model.batch_size,
            },
            "sampling": self.config.sampling.model_dump(),
            "prompt_template_hash": self.config.prompt.digest() if self.config.prompt else None,
        }


class BatchRows:
    """A shard's input rows, checked, as pipeline rows (picklable: the workers that read run it)."""

    def __init__(self, config: BatchJobConfig, input_format: str):
        self.config, self.input_format = config, input_format
        self.table_requests = TableRequests(config) if input_format != "openai_batch" else None

    def __call__(self, shard: Shard, first_index: int, earlier: dict[int, int]) -> Iterator[InputRow | RowError]:
        for item in self._requests(shard, first_index, earlier):
            yield item if isinstance(item, RowError) else _batch_row(item)

    def _requests(self, shard: Shard, first_index: int, earlier: dict[int, int]) -> Iterator[Request | RowError]:
        if self.input_format == "parquet":
            yield from read_requests(self.config, "parquet")  # one shard, read in order
            return
        for index, line in shard_lines(shard, first_index):
            if self.table_requests is None:
                yield batch_line(index, line, self.config.sampling, earlier.get(index))
                continue
            record = table_record(index, line)
            keyed = (
                record if isinstance(record, RowError) else keyed_row(index, record, self.config.id_column, earlier.get(index))
            )
            yield keyed if isinstance(keyed, RowError) else self.table_requests(*keyed)


def _batch_row(request: Request) -> InputRow:
    payload = {"messages": request.messages, "sampling": request.sampling.model_dump(), "row": request.row}
    return InputRow(request.index, request.key, {"row_json": json.dumps(payload, ensure_ascii=False, default=str)})
