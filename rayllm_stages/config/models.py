"""Job configuration: pydantic models that are the YAML files, the CLI input and the flow parameters.

Unknown keys are errors that name the key. Fields that are not ours pass through to Ray:
`model.engine_kwargs` to vLLM, `model.processor_kwargs` to the `ray.data.llm` processor config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prefect_rayllm.rayllm_stages.config.base import RowJobConfig, StrictModel


class SamplingParams(StrictModel):
    """Sampling defaults for every row; an OpenAI Batch request body may override them per row.

    What reaches the engine is `llm.rows.EngineSampling` (every key, fixed types) built from these."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="-1 or None disables top-k")
    max_tokens: int = Field(64, ge=1)
    min_tokens: int = Field(0, ge=0)
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)

    @field_validator("top_k")
    @classmethod
    def _top_k_valid(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return value

    @model_validator(mode="after")
    def _min_tokens_fit(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class PromptTemplate(StrictModel):
    """Chat prompt for table inputs: sandboxed Jinja2 over the row's columns (`{{ text }}`)."""

    system: str | None = None
    user: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class ModelSpec(StrictModel):
    """Which model answers, on which engine, and how it is sized."""

    source: str = Field(description="HF id, local folder or s3:// path (vllm); model name (http)")
    id: str | None = Field(None, description="Model name written in outputs; default: the folder name")
    engine: Literal["vllm", "http", "serve"] = Field(
        "vllm",
        description="vllm: an engine per job in Ray Data; http: an OpenAI-compatible URL; serve: a "
        "Ray Serve LLM engine shared by every step and job that names the same serve_app",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine args")
    concurrency: int | tuple[int, int] = Field(1, description="engine replicas (or min, max)")
    batch_size: int = Field(32, ge=1)
    accelerator_type: str | None = None
    placement_group_config: dict[str, Any] | None = Field(None, description="default: one CPU bundle when the cluster has no GPU")
    processor_kwargs: dict[str, Any] = Field(default_factory=dict, description="any other ray.data.llm processor config field")
    base_url: str | None = Field(None, description="engine http: OpenAI-compatible base URL (…/v1)")
    api_key_env: str | None = Field(None, description="engine http: environment variable with the key")
    api_key_secret: str | None = Field(None, description="engine http: Prefect Secret block name")
    max_retries: int = Field(3, ge=0, description="engine http: retries on 429/5xx/timeouts")
    qps: float | None = Field(None, gt=0, description="engine http: request rate per actor")
    serve_app: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="engine serve: Serve application name (default rayllm-<id>)"
    )
    keep_serving: bool = Field(False, description="engine serve: leave the engine running after the job (share it across jobs)")

    @field_validator("concurrency")
    @classmethod
    def _concurrency_valid(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = _bounds(value)
        if low < 1 or high < low:
            raise ValueError("concurrency must be >= 1, or (min, max) with 1 <= min <= max")
        return value

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) engine replicas: `concurrency` as a pair."""
        return _bounds(self.concurrency)

    @model_validator(mode="after")
    def _engine_fields_match(self) -> ModelSpec:
        if self.engine == "http":
            if not self.base_url:
                raise ValueError("engine 'http' needs base_url (e.g. http://host:8000/v1)")
            if self.api_key_env and self.api_key_secret:
                raise ValueError("give api_key_env or api_key_secret, not both")
        else:
            for name in ("base_url", "api_key_env", "api_key_secret", "qps"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only for engine 'http'")
        if self.engine != "serve" and (self.serve_app is not None or self.keep_serving):
            raise ValueError("serve_app and keep_serving are only for engine 'serve'")
        return self

    def engine_identity(self) -> dict[str, Any]:
        """What must match for two steps to share one Serve engine."""
        return {
            "source": self.source,
            "id": self.served_name,
            "engine_kwargs": self.engine_kwargs,
            "concurrency": self.concurrency,
            "placement_group_config": self.placement_group_config,
            "accelerator_type": self.accelerator_type,
        }

    def resume_fingerprint(self) -> dict[str, Any]:
        """The model settings that change results (sizing and retries do not)."""
        return {
            "model.source": self.source,
            "model.engine": self.engine,
            "model.engine_kwargs": self.engine_kwargs,
            "model.base_url": self.base_url,
        }

    @property
    def served_name(self) -> str:
        return self.id or Path(self.source.rstrip("/")).name or self.source

    @property
    def serve_app_name(self) -> str:
        """engine serve: the Serve application hosting this model."""
        return self.serve_app or f"rayllm-{self.served_name}"


class BatchJobConfig(RowJobConfig):
    """One batch inference job: an OpenAI Batch file or a table in, results and errors out.

    `output`, `id_column`, `max_error_rate`, `ray_address`, `storage_options` and `commit_every_rows`
    are the fields every row job shares (`RowJobConfig`).

    Example:
        ```yaml
        input: s3://bucket/requests.jsonl
        output: s3://bucket/run-1/
        model: {source: ./models/tiny, engine: vllm, engine_kwargs: {max_model_len: 256}}
        sampling: {temperature: 0.0, max_tokens: 16}
        max_error_rate: 0.05
        ```
    """

    input: str = Field(description="fsspec URL of an OpenAI Batch JSONL file or a JSONL/Parquet table")
    input_format: Literal["auto", "openai_batch", "jsonl", "parquet"] = Field(
        "auto", description="auto: .parquet is a table; JSONL with custom_id+body is OpenAI Batch"
    )
    model: ModelSpec
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    prompt: PromptTemplate | None = Field(None, description="tables: the chat prompt template")

    @model_validator(mode="after")
    def _table_needs_prompt(self) -> BatchJobConfig:
        if self.input_format in ("jsonl", "parquet") and self.prompt is None:
            raise ValueError(f"input_format '{self.input_format}' is a table and needs a prompt template")
        return self

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings that change results: a rerun with other values may not resume."""
        return {
            "input": self.input,
            "input_format": self.input_format,
            "id_column": self.id_column,
            **self.model.resume_fingerprint(),
            "sampling": self.sampling.model_dump(),
            "prompt": self.prompt.model_dump() if self.prompt else None,
        }


class ChainStep(StrictModel):
    """One step of a chain: its own model, prompt, sampling and output column."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    model: ModelSpec
    prompt: PromptTemplate
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    output_column: str
    parse: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = Field(
        None, description="parse json: the reply must match it; vLLM structured outputs enforce it"
    )

    @model_validator(mode="after")
    def _schema_goes_with_json(self) -> ChainStep:
        if self.parse == "json" and self.json_schema is None:
            raise ValueError("parse 'json' needs json_schema")
        if self.parse == "text" and self.json_schema is not None:
            raise ValueError("json_schema needs parse 'json'")
        return self


class ChainJobConfig(RowJobConfig):
    """A table through ordered LLM steps; each step reads input columns and earlier steps' outputs.

    Example:
        ```yaml
        input: s3://bucket/questions.parquet
        output: s3://bucket/chain-run/
        steps:
          - {name: reformat, model: {source: ./small}, prompt: {user: "Rewrite: {{ q }}"}, output_column: clean_q}
          - {name: answer, model: {source: ./big}, prompt: {user: "{{ clean_q }}"}, output_column: answer}
        ```
    """

    input: str = Field(description="fsspec URL of a JSONL or Parquet table")
    input_format: Literal["auto", "jsonl", "parquet"] = "auto"
    steps: list[ChainStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _steps_are_distinct(self) -> ChainJobConfig:
        names = [s.name for s in self.steps]
        columns = [s.output_column for s in self.steps]
        for kind, values in (("name", names), ("output_column", columns)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"step {kind}s must be unique; repeated: {', '.join(repeated)}")
        shared: dict[str, ChainStep] = {}
        for step in self.steps:
            if step.model.engine != "serve":
                continue
            app = step.model.serve_app_name
            first = shared.setdefault(app, step)
            if first.model.engine_identity() != step.model.engine_identity():
                raise ValueError(
                    f"steps {first.name!r} and {step.name!r} share the Serve engine {app!r} but configure it "
                    "differently (source, id, engine_kwargs, concurrency or placement); make them equal or "
                    "give one a serve_app of its own"
                )
        return self

    def resume_fingerprint(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "input_format": self.input_format,
            "id_column": self.id_column,
            "steps": [
                {
                    "name": s.name,
                    **s.model.resume_fingerprint(),
                    "prompt": s.prompt.model_dump(),
                    "sampling": s.sampling.model_dump(),
                    "output_column": s.output_column,
                    "parse": s.parse,
                    "json_schema": s.json_schema,
                }
                for s in self.steps
            ],
        }


def _bounds(concurrency: int | tuple[int, int]) -> tuple[int, int]:
    return (concurrency, concurrency) if isinstance(concurrency, int) else (concurrency[0], concurrency[1])
