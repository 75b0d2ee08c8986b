"""What every config shares: strict pydantic models, YAML loading, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names the key or field at fault."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
