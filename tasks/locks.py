"""One rollout per endpoint at a time: a Prefect global concurrency limit named after the endpoint.

A deployment's `concurrency_limit` serialises the runs of that one deployment. Rollouts of one
endpoint may come from several places (the deployment, an automation, `rayllm serve`, a Python
call), so the lock is taken inside the flow, on a server-wide limit `rollout-<endpoint>` with one
slot. Other endpoints roll out at the same time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


def endpoint_lock_name(endpoint: str) -> str:
    """The global concurrency limit that guards `endpoint`."""
    return f"rollout-{endpoint}"


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit `name` with `limit` slots unless it exists (an operator
    may have changed it: an existing limit is left as it is)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            pass  # another run created it first


@contextmanager
def endpoint_lock(endpoint: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the endpoint's rollout slot; another rollout of the same endpoint waits (or times out).

    Args:
        endpoint: The endpoint (router application) name.
        timeout_seconds: Give up waiting after this long (TimeoutError); None waits.

    Example:
        ```python
        @flow
        def rollout_endpoint(config: RolloutConfig):
            with endpoint_lock(config.endpoint):
                ...
        ```
    """
    name = endpoint_lock_name(endpoint)
    ensure_limit(name)
    # The lease is renewed in the background while the rollout runs (minutes); a failed renewal
    # must not kill a rollout half-way (its own clean-up, remove_candidate, keeps the endpoint safe).
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True, raise_on_lease_renewal_failure=False):
        yield
