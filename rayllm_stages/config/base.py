"""What every config shares: strict pydantic models, YAML loading, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names the key or field at fault."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class JobConfig(StrictModel):
    """What every job config shares (batch, chain, evaluation, curation, rollout): where Ray runs.

    The shared fields are declared once here; the YAML keys stay top-level keys of each job's file.
    In the JSON schema (the Prefect UI's form) they come after the job's own fields.
    """

    ray_address: str | None = Field(None, description="None: local Ray; 'auto' or ray://host:10001 for a cluster")

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        target = handler.resolve_ref_schema(json_schema)
        properties = target.get("properties")
        if properties:
            # the job's own fields first (a row job's input and output before them), then the shared ones
            shared = [name for base in cls.__mro__ if base in _JOB_BASES for name in base.__annotations__]
            leading = ["input", "output"] if "input" in properties else []
            own = [k for k in properties if k not in shared]
            trailing = [k for k in shared if k in properties and k not in leading]
            target["properties"] = {k: properties[k] for k in leading + own + trailing}
        return json_schema


class OutputJobConfig(JobConfig):
    """A job that writes to an output folder and commits its work there as it goes (so it resumes)."""

    output: str = Field(description="fsspec URL of the output folder")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the job's files (e.g. client_kwargs.endpoint_url)"
    )
    commit_every_rows: int = Field(500, ge=1, description="rows per committed part file: the most a crash can lose")


class RowJobConfig(OutputJobConfig):
    """A job over the rows of one input file: every row ends in the results or the errors file."""

    input: str = Field(description="fsspec URL of the input file")
    id_column: str | None = Field(None, description="tables: column holding a unique row id (default: the row number)")
    max_error_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="the run fails (after writing) above this share of failed rows"
    )


_JOB_BASES = (JobConfig, OutputJobConfig, RowJobConfig)


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the dotted key: `model.engin: unknown key`."""
    lines = [f"{source} is invalid:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(model: type[BaseModel], path: str | Path, overrides: dict[str, Any] | None = None):
    """Load a YAML job config into `model`, raising `ConfigError` with each bad key named."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    data.update(overrides or {})
    return validate_config(model, data, source=str(path))


def validate_config(model: type[BaseModel], data: Any, source: str = "config"):
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
