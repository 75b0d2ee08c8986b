"""What a `rayllm` command prints on its console, and that nothing it starts outlives it.

`--log-format` (or `RAYLLM_LOG_FORMAT`):
    progress  (default) a progress bar or one line per step, then a summary; Prefect's log lines
              only from WARNING up, one line each (no tracebacks). The full logs, tracebacks
              included, are in the Prefect run (UI, API) either way.
    text      Prefect's log lines as Prefect prints them (INFO and up), then the summary.
    json      Prefect's log lines as JSON objects, one per line (INFO and up), then the summary.

Ray's own driver messages (connecting, Serve's deployment options) are shown only with `text`.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum

from rich.console import Console
from rich.markup import escape

FORMAT_ENV = "RAYLLM_LOG_FORMAT"


class LogFormat(StrEnum):
    progress = "progress"
    text = "text"
    json = "json"


_format = LogFormat.progress


def start_command(log_format: LogFormat | str = LogFormat.progress, supervise: bool = True) -> None:
    """Set up a `rayllm` command before it starts anything: its console (see the module doc) and,
    with `supervise`, the watchdog that stops whatever it starts when it ends, SIGKILL included
    (`rayllm_stages.runtime.supervision`), after stopping what earlier killed commands left."""
    configure_console(log_format)
    if supervise:
        from prefect_rayllm.rayllm_stages.runtime import supervision

        supervision.supervise()


def configure_console(log_format: LogFormat | str) -> None:
    """Prefect's console handler at WARNING (progress) or as JSON (json); Ray's driver loggers
    quiet unless `text`. Works before Prefect is imported (through Prefect's logging settings in
    the environment) and after (on the handlers it configured)."""
    global _format
    _format = LogFormat(log_format)
    os.environ[FORMAT_ENV] = _format.value
    if _format is LogFormat.text:
        return
    if _format is LogFormat.progress:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    else:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER", "json")
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")  # read when Ray is imported
    apply_console_settings()


def apply_console_settings() -> None:
    """Apply the format to what is configured now: Prefect's console handler (once Prefect is
    imported) and Ray's and Ray Serve's own driver loggers (WARNING, unless `text`). Ray Serve sets
    its logger to INFO when it is imported: call this again once it is (after connecting)."""
    if _format is LogFormat.text:
        return
    if "prefect.logging.handlers" in sys.modules:
        _adjust_prefect_console()
    for name in ("ray", "ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _OneLine(logging.Formatter):
    """Another formatter's lines without the traceback or stack that a record may carry."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord(record.__dict__)
        plain.exc_info, plain.exc_text, plain.stack_info = None, None, None
        return self.inner.format(plain).split("\nTraceback (most recent call last)")[0]


def _adjust_prefect_console() -> None:
    from prefect.logging.formatters import JsonFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            if _format is LogFormat.progress:
                handler.setLevel(logging.WARNING)
                if not isinstance(handler.formatter, _OneLine) and handler.formatter is not None:
                    handler.setFormatter(_OneLine(handler.formatter))
            elif _format is LogFormat.json and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter("default", "", "%"))


def current_format() -> LogFormat:
    return _format


def print_step(console: Console):
    """A step listener (`tasks.progress.step_listener`) printing one line per step start and end,
    in the progress format only."""

    def listener(step: str, state: str, seconds: float, detail: str) -> None:
        if _format is not LogFormat.progress:
            return
        if state == "started":
            console.print(f"[dim]…[/] {escape(step)}")
            return
        mark = "[green]✓[/]" if state == "passed" else "[red]✗[/]"
        console.print(f"{mark} {escape(step)} [dim]({seconds:.1f} s)[/] {escape(detail)}")

    return listener
