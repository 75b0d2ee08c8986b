"""Batch inference without Prefect: an OpenAI Batch file or a table through one model.

    input rows --(checked, done rows skipped)--> Ray Dataset (llm.rows.ROW_SCHEMA; row_json: the request)
      --> ray.data.llm processor (vLLM or HTTP) --> driver --> committed parts
      --> finalize: results.jsonl + errors.jsonl + manifest.json

Example:
    >>> job = BatchJob(BatchJobConfig(input="requests.jsonl", output="out/", model={"source": "./tiny"}))
    >>> job.prepare()
    >>> job.execute()
    >>> manifest = job.finalize()
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prefect_rayllm.rayllm_stages.config.models import BatchJobConfig
from prefect_rayllm.rayllm_stages.io.batch_input import Request, RowError, check_input, count_rows, read_requests
from prefect_rayllm.rayllm_stages.io.batch_output import OpenAIBatchFormat, TableFormat
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Execution, InputRow, LLMJob, Preparation, ResumeRefused, rows_per_block

__all__ = ["BatchJob", "Execution", "Preparation", "ResumeRefused"]


class BatchJob(LLMJob):
    """One batch job bound to its output location (the lifecycle of `ResumableJob`, rows as in `LLMJob`)."""

    kind = "batch"
    config: BatchJobConfig

    def check_input(self) -> str:
        return check_input(self.config)

    def count_rows(self, input_format: str) -> int:
        return count_rows(self.config, input_format)

    def block_rows(self) -> int:
        return rows_per_block(self.config.model.batch_size)

    def input_rows(self, input_format: str) -> Iterator[InputRow | RowError]:
        for item in read_requests(self.config, input_format):
            yield item if isinstance(item, RowError) else _batch_row(item)

    def pipeline(self, refs: list[Any], attempt: int):
        import ray

        return self.processor_for(self.config.model, api_key=self.api_key)(ray.data.from_arrow_refs(refs))

    def formatter(self, input_format: str) -> OpenAIBatchFormat | TableFormat:
        if input_format == "openai_batch":
            return OpenAIBatchFormat(self.config.model.served_name, run_key=self.config.output)
        return TableFormat()

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


def _batch_row(request: Request) -> InputRow:
    payload = {"messages": request.messages, "sampling": request.sampling.model_dump(), "row": request.row}
    return InputRow(request.index, request.key, {"row_json": json.dumps(payload, ensure_ascii=False, default=str)})
