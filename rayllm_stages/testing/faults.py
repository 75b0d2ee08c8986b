"""Fault injectors for tests: a crash we cause on purpose, to prove that a job resumes.

Nothing here is on the engine's hot path: a test wraps the step it wants to crash, and only that
wrapped step counts rows. The production steps know nothing of faults.

Example (crash step 2 of a chain once, after 20 rows, then rerun):
    >>> job = ChainJob(config)
    >>> job.prepare()
    >>> job.steps[1] = StepFaultInjector(job.steps[1], after_rows=20, marker=str(tmp_path / "fired"))
    >>> job.execute()  # raises InjectedFault
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prefect_rayllm.rayllm_stages.llm.steps import ChatRequest, LLMStep


class InjectedFault(RuntimeError):
    """The crash a fault injector causes."""


class StepFaultInjector:
    """An `LLMStep` that behaves as `step` but crashes once, after it has built `after_rows`
    requests in all.

    Ray runs the step in many processes, each with its own copy of this object, so rows are
    counted in a file beside `marker` (one byte per row: appends are atomic across processes), and
    `marker` records that the fault fired, so that a rerun goes through.
    """

    def __init__(self, step: LLMStep, after_rows: int, marker: str):
        self.step = step
        self.after_rows = after_rows
        self.marker = marker
        self.name = step.name
        self.images = step.images
        self.json_schema = step.json_schema
        self.sampling = step.sampling
        self.placeholder = step.placeholder

    def request(self, row: Mapping[str, Any]) -> ChatRequest:
        counter = self.marker + ".rows"
        with open(counter, "ab") as handle:
            handle.write(b".")
        if os.path.getsize(counter) > self.after_rows and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise InjectedFault(f"injected fault after {self.after_rows} rows")
        return self.step.request(row)

    def record(self, row: Mapping[str, Any], text: str) -> str:
        return self.step.record(row, text)
