"""API keys for HTTP engines: from an environment variable or a Prefect Secret block, never a parameter."""

from __future__ import annotations

import os

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import ModelSpec


def resolve_api_key(spec: ModelSpec) -> str | None:
    """The key named by `model.api_key_env` or `model.api_key_secret`, or None when neither is set.

    Raises:
        ConfigError: the variable is unset or the Secret block does not exist (the name is given,
            the value never is).
    """
    if spec.api_key_env:
        value = os.environ.get(spec.api_key_env)
        if not value:
            raise ConfigError(f"model.api_key_env: environment variable {spec.api_key_env} is not set")
        return value
    if spec.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(spec.api_key_secret).get())  # type: ignore[union-attr]
        except ValueError as exc:
            raise ConfigError(f"model.api_key_secret: no Prefect Secret block named {spec.api_key_secret!r}") from exc
    return None
