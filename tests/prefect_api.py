"""Reading back what a flow run left in the real Prefect server: artifacts and events."""

from __future__ import annotations

import time
from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter


def artifacts_with_key(key: str):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def wait_for_event(name: str, resource_id: str, timeout_s: float = 30.0, since: datetime | None = None):
    """The newest event with this name about this resource that occurred at or after `since`.

    Events reach the API asynchronously: without `since`, an earlier run's event about the same
    resource can answer before this run's arrives.
    """
    deadline = time.time() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            occurred = EventOccurredFilter(since=since) if since else EventOccurredFilter()  # `until` defaults to now
            event_filter = EventFilter(
                occurred=occurred, event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])
            )
            page = client.read_events(filter=event_filter, limit=10)
            if page.events:
                return page.events[0]
            if time.time() > deadline:
                raise AssertionError(f"no event {name} for {resource_id} since {since} within {timeout_s} s")
            time.sleep(1)
