"""A bounded OpenAI client load against an endpoint, to measure a rollout's downtime (tests, bench)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from prefect_rayllm.rayllm_stages.rollout.traffic import VERSION_HEADER, percentile


@dataclass
class Sample:
    """One client request: when it ran, whether it succeeded, which version answered, what it said."""

    start: float
    end: float
    ok: bool
    version: str | None = None
    text: str | None = None
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


class ClientLoad:
    """A bounded client load: `concurrency` threads, each sending one OpenAI chat request after the
    other to `base_url`, until stopped. Used to measure a rollout's downtime (tests, bench).

    The OpenAI client is created with retries off: a retried failure would hide downtime.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str,
        *,
        concurrency: int = 2,
        max_tokens: int = 4,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        pause_s: float = 0.0,
    ):
        from openai import (
            OpenAI,  # a dev/bench dependency: the library itself needs no client
        )

        self._client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout_s)
        self._model, self._prompt, self._max_tokens = model, prompt, max_tokens
        self._concurrency, self._pause_s = concurrency, pause_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.samples: list[Sample] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ClientLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self._concurrency):
            thread = threading.Thread(target=self._run, name=f"client-load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.time()
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self._model,
                    messages=[{"role": "user", "content": self._prompt}],
                    max_tokens=self._max_tokens,
                    temperature=0.0,
                )
                reply = raw.parse()
                sample = Sample(start, time.time(), True, raw.headers.get(VERSION_HEADER), reply.choices[0].message.content)
            except Exception as exc:  # every failure counts, whatever its kind
                sample = Sample(start, time.time(), False, error=f"{type(exc).__name__}: {exc}"[:300])
            with self._lock:
                self.samples.append(sample)
            if self._pause_s:
                self._stop.wait(self._pause_s)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Requests, failures, p50/p99 latency and the share of answers per version."""
    served = [s for s in samples if s.ok]
    latencies = [s.latency_s for s in served]
    versions: dict[str, int] = {}
    for s in served:
        versions[s.version or "?"] = versions.get(s.version or "?", 0) + 1
    return {
        "requests": len(samples),
        "failures": len(samples) - len(served),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "versions": versions,
    }
