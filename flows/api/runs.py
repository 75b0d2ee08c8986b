"""Each batch is a flow run of the batch deployment: created, read, cancelled and, when the process
that ran it is gone, put back in the queue, through the Prefect API.

The run is named after the batch and tagged with its id (find it in the UI by either); a work
pool's worker, or the `rayllm api` process itself (serving the deployment), runs it; Prefect
retries it; the batch flow resumes from its committed rows on every new attempt.

A run whose process was killed (its machine went away, or the `rayllm api` that served it was
stopped) is Crashed when the process could still say so on its way out (SIGTERM), and otherwise stays
Running (or Pending) for ever in Prefect. Prefect retries neither. The API puts such a run back in
the queue (AwaitingRetry), up to `max_resumes` times: a Crashed one at once (`service.py`), a silent
one when it can tell that its process is gone (`orphaned`):
    served by this process     the run's state is older than this process and no process on this
                               machine runs it (`PREFECT__FLOW_RUN_ID` in its environment)
    run by a worker            it sent heartbeats (Prefect's flow runs do, every 180 s by default)
                               and none for `stale_after_s`
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect_rayllm.rayllm_stages.batch_api.objects import RunView

logger = logging.getLogger("prefect_rayllm.api")

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
FINALIZE_TASK = "finalize-batch"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
RUN_ID_ENV = "PREFECT__FLOW_RUN_ID"
TAG = "openai-batch"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def prefect_client():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


@dataclass
class SeenRun:
    """A run as the API needs it: its view, and what recovery needs to know."""

    view: RunView
    served: bool  # no work pool: a `prefect.serve` runner (such as `rayllm api`'s) runs it
    last_heartbeat: float | None = None


def orphaned(run: SeenRun, *, now: float, serving_since: float | None, alive_here: bool, stale_after_s: float) -> bool:
    """Whether the process running `run` is gone while Prefect still has it Pending, Running or Cancelling.

    Args:
        serving_since: when this process started serving the deployment (None: a worker runs the batches).
        alive_here: a process on this machine runs it.
    """
    view = run.view
    if view.state not in ("PENDING", "RUNNING", "CANCELLING"):
        return False
    if run.served and serving_since is not None:
        # The one runner of these runs is this process: a run in that state since before it started
        # was its predecessor's, and once no process here runs it, it is gone.
        return view.state_at < serving_since and not alive_here
    if view.state != "RUNNING" or run.last_heartbeat is None:
        return False  # no heartbeat seen: nothing to tell a silent run from a dead one
    return now - max(run.last_heartbeat, view.state_at) > stale_after_s


def short_message(message: str | None, limit: int = 500) -> str | None:
    """A state's message as a batch error shows it: its first line, plain (the Prefect UI has the rest)."""
    if not message:
        return message
    first = " ".join(ANSI.sub("", message).strip().splitlines()[0].split())
    return first if len(first) <= limit else first[: limit - 1] + "…"


def flow_runs_alive_here() -> set[str]:
    """The flow run ids that processes of this machine (that this user may read) are running."""
    import psutil

    ids: set[str] = set()
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            value = proc.environ().get(RUN_ID_ENV)
        except (psutil.Error, OSError):
            continue
        if value:
            ids.add(value)
    return ids


class BatchRuns:
    """The flow runs of the batch deployment `deployment` ("flow/deployment")."""

    def __init__(self, deployment: str, serving_since: float | None = None, stale_after_s: float = 900.0):
        self.deployment = deployment
        self.serving_since = serving_since
        self.stale_after_s = stale_after_s

    def submit(self, batch_id: str, parameters: dict[str, Any]) -> str:
        """Create the batch's run (or find the one created before: the batch id is its idempotency key).

        Raises:
            LookupError: the deployment is not registered (the message says how to register it).
        """
        from prefect.exceptions import ObjectNotFound

        with prefect_client() as client:
            try:
                deployment = client.read_deployment_by_name(self.deployment)
            except ObjectNotFound:
                raise LookupError(
                    f"no deployment {self.deployment!r} in the Prefect API: register it with `rayllm deploy`, "
                    "or run `rayllm api` without --no-serve to serve it from the API process"
                ) from None
            run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters=parameters,
                name=batch_id,
                tags=[TAG, batch_id],
                idempotency_key=f"rayllm-api-{batch_id}",
            )
        logger.info("batch %s: flow run %s (%s)", batch_id, run.id, self.deployment)
        return str(run.id)

    def seen(self, run_id: str, *, with_heartbeat: bool = False) -> SeenRun | None:
        """The run's state, times and whether its finalize task started; None when the run is gone."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
        from prefect.exceptions import ObjectNotFound

        with prefect_client() as client:
            try:
                run = client.read_flow_run(UUID(run_id))
            except ObjectNotFound:
                return None
            state = run.state
            state_type = state.type.value if state else "SCHEDULED"
            finalizing_at = None
            if state_type in ("RUNNING", "COMPLETED"):
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=FINALIZE_TASK)),
                )
                starts = [t.start_time.timestamp() for t in tasks if t.start_time is not None]
                finalizing_at = min(starts) if starts else None
            view = RunView(
                state=state_type,
                state_at=state.timestamp.timestamp() if state else time.time(),
                message=short_message(state.message) if state else None,
                started_at=run.start_time.timestamp() if run.start_time else None,
                ended_at=run.end_time.timestamp() if run.end_time and state_type in FINAL_STATES else None,
                finalizing_at=finalizing_at,
            )
            seen = SeenRun(view=view, served=run.work_pool_name is None)
            if with_heartbeat and state_type == "RUNNING" and not (seen.served and self.serving_since is not None):
                seen.last_heartbeat = _last_heartbeat(client, run.id, run.start_time)
            return seen

    def cancel(self, run_id: str, reason: str) -> None:
        """Ask Prefect to cancel the run: its runner or worker stops the process; a run not started is cancelled at once."""
        from prefect.states import Cancelling

        with prefect_client() as client:
            client.set_flow_run_state(UUID(run_id), Cancelling(message=reason))

    def is_orphaned(self, seen: SeenRun, alive_here: set[str] | None = None, run_id: str = "") -> bool:
        here = run_id in (alive_here if alive_here is not None else set())
        return orphaned(
            seen, now=time.time(), serving_since=self.serving_since, alive_here=here, stale_after_s=self.stale_after_s
        )

    def requeue(self, run_id: str, message: str) -> None:
        """Put a run whose process is gone back in the queue; its next attempt resumes from the committed rows."""
        from prefect.states import AwaitingRetry

        with prefect_client() as client:
            client.set_flow_run_state(UUID(run_id), AwaitingRetry(scheduled_time=datetime.now(UTC), message=message), force=True)

    def end(self, run_id: str, state: str, message: str) -> None:
        """Close a run whose process is gone for good: Crashed (or Cancelled when it was being cancelled)."""
        from prefect.states import Cancelled, Crashed

        with prefect_client() as client:
            if state == "CANCELLING":
                client.set_flow_run_state(UUID(run_id), Cancelled(message=message), force=True)
            else:
                client.set_flow_run_state(UUID(run_id), Crashed(message=message), force=True)


def _last_heartbeat(client: Any, run_id: UUID, since: datetime | None) -> float | None:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    occurred = EventOccurredFilter(since=since) if since else EventOccurredFilter()
    page = client.read_events(
        filter=EventFilter(
            occurred=occurred,
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        ),
        limit=1,
    )
    return page.events[0].occurred.timestamp() if page.events else None
