"""The Batch API's configuration (`rayllm api CONFIG.yaml`): where files and batches live, which
models a request may name, how callers are authenticated, and which deployment runs the batches.

Example:
    ```yaml
    storage: ./.rayllm/api/            # fsspec URL: files, batch records, batch outputs
    models:                            # body.model -> the model that answers
      tiny: {source: ./models/tiny, engine_kwargs: {max_model_len: 256}}
    sampling: {max_tokens: 256}        # defaults; each request's body overrides them
    api_key_env: RAYLLM_API_KEY        # or api_key_secret: <Prefect Secret block name>
    ```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import ConfigError, StrictModel, load_config, storage_block_field
from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams

DEFAULT_KEY_ENV = "RAYLLM_API_KEY"


class ApiConfig(StrictModel):
    """The OpenAI-compatible Batch API: files and batches at `storage`, batches run as `deployment`."""

    storage: str = Field("./.rayllm/api/", description="fsspec URL where files, batch records and outputs live")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, description="fsspec options for `storage`")
    storage_block: str | None = storage_block_field()
    models: dict[str, ModelSpec] = Field(min_length=1, description="the names requests give in body.model -> the model")
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="defaults; a request's body overrides them")
    api_key_env: str | None = Field(None, description=f"environment variable holding the bearer key (default {DEFAULT_KEY_ENV})")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the bearer key")
    deployment: str = Field("batch-inference/batch", description="the deployment each batch is a run of (flow/deployment)")
    ray_address: str | None = Field(None, description="passed to each batch run: None local Ray, 'auto' or ray://")
    ray_block: str | None = Field(
        None, min_length=1, description="passed to each batch run instead of ray_address: a Ray connection block"
    )
    commit_every_rows: int = Field(500, ge=1, description="rows per committed part: the most a crash can lose")
    max_resumes: int = Field(3, ge=0, description="times a batch whose run's process is gone is put back in the queue")
    stale_after_s: float = Field(
        900.0, gt=0, description="worker runs: no heartbeat for this long means the process is gone (Prefect beats every 180 s)"
    )
    sweep_every_s: float = Field(10.0, gt=0, description="how often active batches are looked at (expiry, recovery, outputs)")

    @model_validator(mode="after")
    def _one_key_source(self) -> ApiConfig:
        if self.api_key_env and self.api_key_secret:
            raise ValueError("give api_key_env or api_key_secret, not both")
        return self

    @property
    def deployment_name(self) -> str:
        """The deployment's own name (`batch` of `batch-inference/batch`)."""
        return self.deployment.rsplit("/", 1)[-1]


def load_api_config(path: str | Path) -> ApiConfig:
    """`ApiConfig` from YAML; `ConfigError` names the file, each bad key and its line."""
    return load_config(ApiConfig, path)


def resolve_bearer_key(config: ApiConfig) -> str:
    """The key callers must send (`Authorization: Bearer <key>`); it is never logged or passed on.

    Raises:
        ConfigError: the variable is unset or empty, or the Secret block does not exist (named, the value never).
    """
    if config.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            value = str(Secret.load(config.api_key_secret).get())  # type: ignore[union-attr]
        except ValueError as exc:
            raise ConfigError(f"api_key_secret: no Prefect Secret block named {config.api_key_secret!r}") from exc
        if not value:
            raise ConfigError(f"api_key_secret: the Prefect Secret block {config.api_key_secret!r} is empty")
        return value
    name = config.api_key_env or DEFAULT_KEY_ENV
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(
            f"api_key_env: environment variable {name} is not set; the API needs a bearer key "
            "(set it, or name a Prefect Secret block in api_key_secret)"
        )
    return value
