"""Ray worker output into a Python logger, at a chosen level and without a flood.

Ray ships every line its workers print (actors, tasks, vLLM engines) to the driver. This module
hooks that stream (Ray's stdstream dispatcher, beside Ray's own console printer) and hands each
line to a `logging.Logger` (or adapter) at the level it carries: vLLM's `INFO 11-24 …`, Python
logging's `… WARNING file.py:12 -- …`, a traceback or `Error:` as ERROR, anything else as INFO.
Only lines at or above the chosen level pass, identical lines repeated within a minute pass once,
and at most `max_lines_per_minute` pass per minute (the rest are counted and reported).

The level comes from `RAYLLM_RAY_LOG_LEVEL` (default WARNING; OFF turns forwarding off). Ray must
be connected with `log_to_driver=True` (the default; `RAYLLM_RAY_LOGS=0` switches it off).

`forwarding_to(logger)` sends the lines to another logger while a block runs (the task that runs
the engine), then back. `keep_root_logging()` stops Ray Serve LLM's import from taking over this
process's root logger (it replaces its handlers with a JSON one at INFO).

Example:
    ```python
    import logging
    from rayllm_stages import ray_logs

    ray_logs.forward_worker_logs(logging.getLogger("my-job"), level="INFO")
    ```
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect_rayllm.rayllm_stages.compat import ray_private

LEVEL_ENV = "RAYLLM_RAY_LOG_LEVEL"
MAX_LINES_ENV = "RAYLLM_RAY_LOG_MAX_LINES_PER_MINUTE"
DEFAULT_LEVEL = "WARNING"
DEFAULT_MAX_LINES_PER_MINUTE = 120
HANDLER_NAME = "rayllm_forward_worker_logs"
OFF = logging.CRITICAL + 10

_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}
# A level word among the first few words of a line: vLLM `INFO 11-24 10:00:00 [x.py:1] …`,
# Python logging `2026-11-24 10:00:00,123\tWARNING x.py:1 -- …`, `[2026-…] ERROR …`, `(pid=1) INFO …`.
_LEVEL_WORD = re.compile(r"^\W*(?:\S+\s+){0,3}?\[?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?[\s:]")
_ERROR_HINT = re.compile(r"Traceback \(most recent call last\)|^\s*\w*(?:Error|Exception)\b.*:|\bERROR\b")
_WARNING_HINT = re.compile(r"\b\w*Warning\b:")
# Prefect's own console lines (`12:00:00.123 | WARNING | Task run 'x' - …`) from tasks that run in
# Ray workers: those runs send their logs to the API themselves.
_PREFECT_CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| \w+\s*\| (?:Task run|Flow run|prefect)")
_NUMBERS = re.compile(r"\d+|0x[0-9a-fA-F]+")


def resolve_level(value: str | int | None = None) -> int:
    """A logging level from a name or number; None reads `RAYLLM_RAY_LOG_LEVEL` (default WARNING).

    Raises:
        ValueError: an unknown level name (the allowed names are listed).
    """
    if value is None:
        value = os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL
    if isinstance(value, int):
        return value
    name = value.strip().upper()
    if name in ("OFF", "NONE", "0", "FALSE"):
        return OFF
    if name.isdigit():
        return int(name)
    if name not in _LEVELS:
        raise ValueError(f"{LEVEL_ENV}: unknown level {value!r}; use DEBUG, INFO, WARNING, ERROR, CRITICAL or OFF")
    return _LEVELS[name]


def line_level(line: str) -> int:
    """The level a worker's output line carries (INFO when it names none)."""
    found = _LEVEL_WORD.match(line)
    if found:
        return _LEVELS[found.group(1)]
    if _ERROR_HINT.search(line):
        return logging.ERROR
    if _WARNING_HINT.search(line):
        return logging.WARNING
    return logging.INFO


class WorkerLogForwarder:
    """Receives Ray's log batches (`{"lines", "pid", "actor_name", "task_name", "is_err", ...}`)
    and logs the lines that pass the level, the repeat filter and the rate cap."""

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter,
        level: int,
        max_lines_per_minute: int = DEFAULT_MAX_LINES_PER_MINUTE,
        clock=time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.max_lines_per_minute = max_lines_per_minute
        self.clock = clock
        self.forwarded = 0
        self.suppressed = 0  # over the rate cap (reported in the next line that passes)
        self.repeats = 0  # identical lines within a minute (dropped)
        self._window_start = clock()
        self._window_count = 0
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        try:
            self._handle(data)
        except Exception:  # never break Ray's log thread
            pass

    def _handle(self, data: dict[str, Any]) -> None:
        source = _source(data)
        for raw in data.get("lines") or []:
            line = raw.rstrip()
            if not line:
                continue
            level = line_level(line)
            if level < self.level or _PREFECT_CONSOLE_LINE.match(line):
                continue
            with self._lock:
                if not self._admit(line):
                    continue
                note = ""
                if self.suppressed:
                    note = f" [{self.suppressed} earlier lines over the {self.max_lines_per_minute}/min cap not shown]"
                    self.suppressed = 0
                self.forwarded += 1
            self.logger.log(level, "[ray %s] %s%s", source, line, note)

    def _admit(self, line: str) -> bool:
        now = self.clock()
        key = _NUMBERS.sub("#", line)
        seen = self._recent.get(key)
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > 512:
            self._recent.popitem(last=False)
        if seen is not None and now - seen < 60:
            self.repeats += 1
            return False
        if now - self._window_start >= 60:
            self._window_start, self._window_count = now, 0
        if self._window_count >= self.max_lines_per_minute:
            self.suppressed += 1
            return False
        self._window_count += 1
        return True


def _source(data: dict[str, Any]) -> str:
    name = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid", "")
    return f"{name} pid={pid}".strip() if name else f"pid={pid}"


def forward_worker_logs(
    logger: logging.Logger | logging.LoggerAdapter, level: str | int | None = None, max_lines_per_minute: int | None = None
) -> WorkerLogForwarder | None:
    """Send the connected Ray's worker output to `logger` from now on (replacing an earlier target).

    Args:
        logger: Where lines go (e.g. a Prefect run logger).
        level: Lowest level that passes; None reads `RAYLLM_RAY_LOG_LEVEL` (default WARNING).
        max_lines_per_minute: Cap; None reads `RAYLLM_RAY_LOG_MAX_LINES_PER_MINUTE` (default 120).

    Returns:
        The forwarder (its counters say what passed), or None when the level is OFF.
    """
    dispatcher = ray_private.worker_stdstream_dispatcher()
    dispatcher.remove_handler(HANDLER_NAME)
    threshold = resolve_level(level)
    if threshold >= OFF:
        return None
    cap = max_lines_per_minute or int(os.environ.get(MAX_LINES_ENV) or DEFAULT_MAX_LINES_PER_MINUTE)
    forwarder = WorkerLogForwarder(logger, threshold, cap)
    dispatcher.add_handler(HANDLER_NAME, forwarder)
    global _active
    _active = forwarder
    return forwarder


_active: WorkerLogForwarder | None = None


def stop_forwarding() -> None:
    """Stop sending worker output to the last logger."""
    global _active
    ray_private.worker_stdstream_dispatcher().remove_handler(HANDLER_NAME)
    _active = None


def active_forwarder() -> WorkerLogForwarder | None:
    """The forwarder installed by the last `forward_worker_logs` (None: none, or forwarding off)."""
    return _active


@contextmanager
def forwarding_to(logger: logging.Logger | logging.LoggerAdapter) -> Iterator[WorkerLogForwarder | None]:
    """Send forwarded worker lines to `logger` while the block runs, then to the previous logger
    again (level, repeat filter and rate cap carry on). Does nothing when nothing is forwarded.

    Example (the lines of the engine a task runs land in that task's log):
        ```python
        with forwarding_to(get_run_logger()):
            run_the_engine()
        ```
    """
    forwarder = _active
    if forwarder is None:
        yield None
        return
    previous, forwarder.logger = forwarder.logger, logger
    try:
        yield forwarder
    finally:
        forwarder.logger = previous


def keep_root_logging() -> None:
    """Import Ray Serve LLM now, keeping this process's root logger as it is.

    Importing `ray.serve.llm` (as the Serve engine paths do) runs its package's setup, which
    replaces the root logger's handlers with one that writes JSON to stderr, and sets its level to
    INFO: every library's INFO records (HTTP requests included) then reach the console as JSON. It
    does so once per process, so importing that package here first, alone (the moment must be short:
    other threads log meanwhile; `compat.ray_private.import_serve_llm_package`), and putting the root
    logger back, keeps the console as the application configured it. Without Ray Serve LLM installed
    it does nothing.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        ray_private.import_serve_llm_package()
    except ray_private.RayCompatError:
        raise
    except Exception:  # not installed, or not importable here: nothing takes the root logger over
        return
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
