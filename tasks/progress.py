"""Progress of long steps: a Prefect progress artifact, plus listeners such as the CLI's progress bar
and its line per rollout step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext

Listener = Callable[[int, int], None]
_listeners: list[Listener] = []


@contextlib.contextmanager
def progress_listener(listener: Listener) -> Iterator[None]:
    """Call `listener(done, total)` while rows finish in this process (the CLI's progress bar)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class ProgressReporter:
    """Feeds one progress artifact (at most every `interval_s`) and every registered listener."""

    def __init__(self, key: str, description: str, interval_s: float = 2.0):
        self.key = key
        self.description = description
        self.interval_s = interval_s
        self._artifact_id: UUID | None = None
        self._last_update = 0.0
        self._last_percent = -1.0

    def __call__(self, done: int, total: int) -> None:
        for listener in list(_listeners):
            listener(done, total)
        percent = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if percent != 100.0 and now - self._last_update < self.interval_s:
            return
        if percent == self._last_percent or not _in_prefect_run():
            return
        self._last_update, self._last_percent = now, percent
        description = f"{self.description}: {done:,} of {total:,} rows"
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(percent, key=self.key, description=description)  # type: ignore[assignment]
        else:
            update_progress_artifact(self._artifact_id, percent, description=description)


StepListener = Callable[[str, str, float, str], None]
_step_listeners: list[StepListener] = []


@contextlib.contextmanager
def step_listener(listener: StepListener) -> Iterator[None]:
    """Call `listener(step, state, seconds, detail)` as each step of a flow in this process starts
    (state "started") and ends ("passed" or "failed"); the CLI prints a line for each."""
    _step_listeners.append(listener)
    try:
        yield
    finally:
        _step_listeners.remove(listener)


def report_step(step: str, state: str, seconds: float = 0.0, detail: str = "") -> None:
    """Tell the step listeners about `step` (a listener's failure never fails the flow)."""
    for listener in list(_step_listeners):
        try:
            listener(step, state, seconds, detail)
        except Exception:
            pass


def _in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None
