"""Everything a command starts ends with it, even when the command is killed with SIGKILL.

`supervise()` makes this process an owner. It adds `<pid>:<start time>` to `RAYLLM_OWNERS` in
its environment, which every process started afterwards inherits, however deep: a temporary
Prefect server, a local Ray's GCS, raylet and workers, vLLM engine processes, writer tasks. It
then starts a small watchdog process. When the owner dies, however it dies, the watchdog stops
every process whose environment names that owner (SIGTERM, then SIGKILL after a short grace) and
exits. What a watchdog could not stop (it died too: `kill -9` of the whole process group, the OOM
killer) is stopped by the next `supervise()` on the machine, which first stops every process that
names an owner that is gone.

Processes on a Ray cluster this process only connected to (`ray_address`) are not its children:
Ray ends that job's workers when its driver disconnects, and Serve applications live on, as they
should.

The marker is read from `/proc/<pid>/environ`, the environment a process started with, so a
process that changes its own environment cannot drop it. A process started by a supervised
process that is itself supervised names both owners, and ends when either dies.

Example:
    ```python
    from prefect_rayllm.rayllm_stages.runtime import supervision

    supervision.supervise()  # first thing, before any child process starts
    ```
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

OWNERS_ENV = "RAYLLM_OWNERS"
# Off switch (e.g. a process manager that already owns the process tree): RAYLLM_SUPERVISE=0.
ENABLE_ENV = "RAYLLM_SUPERVISE"
GRACE_S = 1.0
_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1

_lock = threading.Lock()
_current: Supervisor | None = None


@dataclass(frozen=True)
class Owner:
    """A process that owns what it started, named by its pid and start time (pids are reused)."""

    pid: int
    started: float

    @property
    def token(self) -> str:
        return f"{self.pid}:{self.started:.2f}"

    @classmethod
    def parse(cls, token: str) -> Owner | None:
        pid, _, started = token.strip().partition(":")
        try:
            return cls(int(pid), float(started))
        except ValueError:
            return None

    @classmethod
    def of(cls, pid: int) -> Owner:
        return cls(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


@dataclass(frozen=True)
class Supervisor:
    owner: Owner
    watchdog_pid: int | None


def supervise(*, reap: bool = True) -> Supervisor | None:
    """Make this process the owner of every process it starts from now on (see the module doc).

    Idempotent: a second call returns the first call's supervisor. Linux only (elsewhere, and
    with `RAYLLM_SUPERVISE=0`, it does nothing and returns None).

    Args:
        reap: First stop the processes of owners that died without cleaning up.
    """
    global _current
    if not sys.platform.startswith("linux") or os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    with _lock:
        if _current is not None and _current.owner.pid == os.getpid():
            return _current
        if reap:
            stopped = reap_orphans()
            if stopped:
                logger.info("stopped %d processes left behind by rayllm commands that died", len(stopped))
        owner = Owner.of(os.getpid())
        watchdog = _start_watchdog(owner)  # before the mark: the watchdog is not the owner's work
        owners = [t for t in os.environ.get(OWNERS_ENV, "").split(",") if t.strip()]
        os.environ[OWNERS_ENV] = ",".join([*owners, owner.token])
        _current = Supervisor(owner, watchdog)
        return _current


def owners_of(proc: psutil.Process) -> list[Owner]:
    """The owners named in a process's starting environment (empty when none or unreadable)."""
    try:
        value = proc.environ().get(OWNERS_ENV, "")
    except (psutil.Error, OSError):
        return []
    return [o for o in (Owner.parse(t) for t in value.split(",") if t.strip()) if o is not None]


def owned_by(owner: Owner) -> list[psutil.Process]:
    """Live processes whose environment names `owner` (never this process itself)."""
    me = os.getpid()
    return [proc for proc in psutil.process_iter() if proc.pid != me and owner in owners_of(proc)]


def orphans() -> list[psutil.Process]:
    """Live processes that name an owner which is gone."""
    me, verdicts = os.getpid(), {}
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        for owner in owners_of(proc):
            if owner not in verdicts:
                verdicts[owner] = owner.alive()
            if not verdicts[owner]:
                found.append(proc)
                break
    return found


def reap_orphans(grace_s: float = GRACE_S) -> list[str]:
    """Stop every process that names an owner which is gone; returns what was stopped."""
    return stop([p for p in orphans() if not _is_watchdog(p)], grace_s)


def stop_owned(owner: Owner, grace_s: float = GRACE_S, deadline_s: float = 8.0) -> list[str]:
    """Stop every process `owner` started (and what those start meanwhile), within `deadline_s`."""
    stopped: list[str] = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = owned_by(owner)
        if not found:
            break
        stopped += stop(found, min(grace_s, max(0.5, end - time.monotonic() - 1)))
    return stopped


def stop(procs: list[psutil.Process], grace_s: float = GRACE_S) -> list[str]:
    """SIGTERM each process, SIGKILL those still alive after `grace_s`; returns their descriptions."""
    described = []
    for proc in procs:
        described.append(_describe(proc))
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    return described


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120] or proc.name()}"
    except psutil.Error:
        return str(proc.pid)


# -- the watchdog ---------------------------------------------------------------------------------
_WATCH_ARG = "--rayllm-watchdog"


def _is_watchdog(proc: psutil.Process) -> bool:
    try:
        return _WATCH_ARG in proc.cmdline()
    except psutil.Error:
        return False


def _start_watchdog(owner: Owner) -> int | None:
    log_dir = Path(os.environ.get("RAYLLM_CACHE_DIR", Path.home() / ".cache" / "rayllm")) / "supervision"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{owner.pid}.log", "ab")
    except OSError:
        log = subprocess.DEVNULL  # type: ignore[assignment]
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, _WATCH_ARG, owner.token],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: Ctrl-C and a closed terminal reach the command, not its watchdog.
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        logger.warning("could not start the watchdog (%s): a killed command may leave processes behind", exc)
        return None
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    return process.pid


def _watch(owner: Owner) -> int:
    """The watchdog: wait for the owner (its parent) to die, then stop what it started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    _set_parent_death_signal(signal.SIGUSR1)
    # PR_SET_PDEATHSIG fires when the parent *thread* that started us ends, which may be before
    # the owner: the signal only wakes us early; the parent pid is the truth (the kernel gives a
    # child a new parent the moment its parent dies).
    while os.getppid() == owner.pid:
        signal.sigtimedwait({signal.SIGUSR1}, _POLL_S)
    started = time.monotonic()
    stopped = stop_owned(owner)
    _log(f"owner {owner.token} gone; stopped {len(stopped)} processes in {time.monotonic() - started:.1f} s")
    for line in stopped:
        _log(f"  {line}")
    # A local Ray's agents may start with an environment of their own: stop the rest of a Ray
    # session whose driver is gone by its session folder too (runtime/cluster.py's registry).
    from prefect_rayllm.rayllm_stages.runtime.cluster import reap_orphaned_local_clusters

    reaped = reap_orphaned_local_clusters()
    _log(f"and {reaped} more of dead drivers' local Ray, {time.monotonic() - started:.1f} s after the owner died")
    return 0


def _set_parent_death_signal(sig: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # polling the parent pid still works


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WATCH_ARG and (watched := Owner.parse(sys.argv[2])) is not None:
        sys.exit(_watch(watched))
    sys.exit(f"usage: python -m {__name__} {_WATCH_ARG} PID:START")
