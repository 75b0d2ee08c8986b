"""Prefect blocks of this collection: S3 credentials and a Ray connection, named in configs by block name.

A config names a block (`storage_block: minio-prod`, `ray_block: gpu-cluster`) and never holds the
secret: flow parameters, which Prefect stores and shows, carry the name only. The block is loaded in
the flow process when a task runs and its values go to `rayllm_stages` in memory (a resolved copy of
the config that no task returns, logs or writes). Ray workers that read or write storage get the
options with their work, as they get inline `storage_options`.

Register the types once per Prefect server (the UI then offers them as forms):
`prefect block register -m prefect_rayllm.tasks.blocks`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr

from prefect_rayllm.rayllm_stages.config.base import ConfigError, set_credentials_resolver

if TYPE_CHECKING:
    from prefect_rayllm.rayllm_stages.runtime.cluster import RayConnection as RayConnectionInfo

M = TypeVar("M", bound=BaseModel)


class S3Credentials(Block):
    """Credentials and endpoint of an S3-compatible store (AWS, MinIO, Ceph...), as fsspec/s3fs options.

    Example:
        ```python
        S3Credentials(
            endpoint_url="http://minio:9000", aws_access_key_id="AKIA...", aws_secret_access_key="...", region_name="us-east-1"
        ).save("minio-prod")
        ```
        then `storage_block: minio-prod` in a job config.
    """

    _block_type_name = "RayLLM S3 Credentials"
    _block_type_slug = "rayllm-s3-credentials"
    _description = "S3 credentials and endpoint for prefect-rayllm jobs' inputs and outputs (fsspec/s3fs options)."

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph...); empty for AWS")
    # A secret too: Prefect's block events and the UI show a str field's value.
    aws_access_key_id: SecretStr | None = Field(None, description="Access key id; empty: the machine's own credentials")
    aws_secret_access_key: SecretStr | None = Field(None, description="Secret access key")
    aws_session_token: SecretStr | None = Field(None, description="Session token of temporary credentials")
    region_name: str | None = Field(None, description="Region, e.g. us-east-1")

    def storage_options(self) -> dict[str, Any]:
        """The fsspec/s3fs options these credentials stand for (`key`, `secret`, `token`, `client_kwargs`)."""
        options: dict[str, Any] = {}
        if self.aws_access_key_id is not None:
            options["key"] = self.aws_access_key_id.get_secret_value()
        if self.aws_secret_access_key is not None:
            options["secret"] = self.aws_secret_access_key.get_secret_value()
        if self.aws_session_token is not None:
            options["token"] = self.aws_session_token.get_secret_value()
        client_kwargs = {
            name: value for name, value in (("endpoint_url", self.endpoint_url), ("region_name", self.region_name)) if value
        }
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


class RayConnection(Block):
    """Where a job's Ray runs: the cluster's address, the namespace and the runtime_env of its jobs.

    Example:
        ```python
        RayConnection(address="ray://head:10001", namespace="llm", runtime_env={"pip": ["my-udfs"]}).save("gpu-cluster")
        ```
        then `ray_block: gpu-cluster` in a job config instead of `ray_address`.
    """

    _block_type_name = "RayLLM Ray Connection"
    _block_type_slug = "rayllm-ray-connection"
    _description = "The Ray cluster prefect-rayllm jobs connect to: address, namespace and runtime_env."

    address: str = Field(description="'auto' or ray://host:10001")
    namespace: str | None = Field(None, description="Ray namespace of the jobs' actors (named engines, Serve apps)")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the jobs (pip, env_vars...)")


def load_block(block_type: type[Block], name: str, key: str) -> Any:
    """The block `name` of `block_type`, or `ConfigError` naming the config key, the block and how to make it."""
    if not name:
        raise ConfigError(f"{key}: empty block name")
    try:
        return block_type.load(name)
    except ValueError:
        raise ConfigError(
            f"{key}: no Prefect block {block_type.get_block_type_slug()}/{name} "
            f"(create it in the UI or with {block_type.__name__}(...).save({name!r}))"
        ) from None


def storage_options_of(name: str, key: str = "storage_block") -> dict[str, Any]:
    """The fsspec options of the S3 credentials block `name`."""
    return load_block(S3Credentials, name, key).storage_options()


def storage_options_with_block(name: str | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` merged over the options of the S3 credentials block `name` (just `options` without a name)."""
    return _merged(storage_options_of(name), options or {}) if name else dict(options or {})


def with_storage_credentials(config: M) -> M:
    """`config` with every `storage_block` it names (at any depth) turned into `storage_options`.

    The result holds secrets: hand it to `rayllm_stages` and drop it; never return it from a task,
    pass it to one, log it or write it. A model without blocks comes back as it is. `rayllm_stages`'
    jobs call this themselves (`config.base.with_credentials`, installed below). Options written
    beside a block are merged over the block's (e.g. `default_block_size`); the block's credentials
    and endpoint come first.

    Raises:
        ConfigError: a named block does not exist; the key and the name are given.
    """
    return _resolved(config, "", {})


def _resolved(model: M, prefix: str, loaded: dict[str, dict[str, Any]]) -> M:
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            new = _resolved(value, f"{prefix}{name}.", loaded)
            if new is not value:
                updates[name] = new
        elif isinstance(value, list) and any(isinstance(item, BaseModel) for item in value):
            items = [
                _resolved(item, f"{prefix}{name}[{i}].", loaded) if isinstance(item, BaseModel) else item
                for i, item in enumerate(value)
            ]
            if any(new is not old for new, old in zip(items, value, strict=True)):
                updates[name] = items
    block = getattr(model, "storage_block", None)
    if block and "storage_options" in type(model).model_fields:
        if block not in loaded:
            loaded[block] = storage_options_of(block, f"{prefix}storage_block")
        updates["storage_options"] = _merged(loaded[block], model.storage_options)  # type: ignore[attr-defined]
        updates["storage_block"] = None  # resolved: a second pass (a job built from this copy) loads nothing
    return model.model_copy(update=updates) if updates else model


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**value, **merged[key]}
        else:
            merged.setdefault(key, value)
    return merged


def connect_ray_block(name: str, env_vars: dict[str, str] | None = None, key: str = "ray_block") -> RayConnectionInfo:
    """Connect this process to the cluster of the Ray connection block `name`, with its namespace and
    runtime_env (its env_vars merged over `env_vars`); a live connection is reused as it is.

    Raises:
        ConfigError: no such block.
    """
    import ray

    from prefect_rayllm.rayllm_stages.runtime import cluster as ray_runtime
    from prefect_rayllm.rayllm_stages.runtime import worker_logs

    block: RayConnection = load_block(RayConnection, name, key)
    if not ray.is_initialized():  # a cluster's auth (a token, if any) is Ray's to find, as for ray_address
        runtime_env = dict(block.runtime_env)
        runtime_env["env_vars"] = {**(env_vars or {}), **runtime_env.get("env_vars", {})}
        ray.init(
            address=block.address,
            namespace=block.namespace,
            runtime_env=runtime_env,
            log_to_driver=os.environ.get("RAYLLM_RAY_LOGS", "1") != "0",
        )
        worker_logs.keep_root_logging()
    return ray_runtime.connect(block.address)


set_credentials_resolver(with_storage_credentials)
