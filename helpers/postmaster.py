"""Our postmaster, found and checked through /proc: is it running, and what did a crash leave behind.

The embedded server's lifecycle (``helpers.server``) asks here before it starts or stops anything:
a lock file names a live process only when that pid runs, is no zombie, and was started when the lock
says; a postmaster is ours only when its working folder is our data folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .config import WorkbookError
from .processes import alive, proc_cwd, proc_stat


def pid_file(data: Path) -> list[str] | None:
    """The lines of ``data/postmaster.pid``, or None when there is none (or it cannot be read)."""
    try:
        return (data / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None


_START_SLACK = 5.0  # seconds between a process's fork and the start time PostgreSQL writes in its lock files


def lock_holder_alive(lines: list[str]) -> bool | None:
    """Whether the process that wrote a PostgreSQL lock file (``postmaster.pid`` or ``.s.PGSQL.<port>.lock``:
    pid on line 1, its start time on line 3) is still running. False when that pid is gone, is a zombie
    (PostgreSQL's own ``kill(pid, 0)`` still sees it and refuses to start: issue 13), or now belongs to a
    process started at another time (pid reused after a restart); None when the file cannot be read."""
    try:
        pid, started = int(lines[0]), int(lines[2])
    except (IndexError, ValueError):
        return None
    stat = proc_stat(pid)
    if stat is None:
        return False
    state, _comm, start = stat
    if abs(start - started) > _START_SLACK:
        return False  # another process got that pid
    return state not in ("Z", "X")


def is_ours(pid: int, data: Path) -> bool:
    """True when ``pid`` is a live (not zombie) postmaster working in our data folder."""
    return alive(pid) and proc_cwd(pid) == str(data.resolve())


def running(data: Path) -> tuple[int, int] | None:
    """(pid, port) of a live postmaster on our data folder, else None."""
    lines = pid_file(data)
    if not lines or len(lines) < 4:
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    return (pid, port) if is_ours(pid, data) else None


def orphans(data: Path) -> list[int]:
    """Backends left behind by a postmaster killed with -9 (their cwd is our data folder)."""
    where = str(data.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_cwd(int(entry)) == where:
            found.append(int(entry))
    return found


def socket_locks(data: Path, socket_dir: Path) -> list[Path]:
    """Socket lock files in our socket folder written by a postmaster of OUR data folder (line 2)."""
    ours = []
    with contextlib.suppress(OSError):
        for lock in socket_dir.glob(".s.PGSQL.*.lock"):
            with contextlib.suppress(OSError, IndexError):
                if Path(lock.read_text().splitlines()[1]).resolve() == data.resolve():
                    ours.append(lock)
    return ours


def recover_from_crash(data: Path, socket_dir: Path) -> None:
    """Clear what a postmaster killed with -9 left behind, once it is proven dead (gone or a zombie).

    Its backends are killed (they are ours: their working folder is our data folder). Its lock files
    are removed only when the process that wrote them is gone or a zombie: a zombie postmaster, left
    unreaped by a parent that never waits (Jupyter, ``make lab`` as a container's PID 1), keeps its pid,
    and PostgreSQL would refuse to start beside it forever. A lock whose writer still runs is kept."""
    for pid in orphans(data):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while orphans(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    pidfile = data / "postmaster.pid"
    lines = pid_file(data)
    if lines is not None:
        if lock_holder_alive(lines):
            raise WorkbookError(
                f"A PostgreSQL process (pid {lines[0]}) still holds {pidfile} but does not work in that "
                f"folder; the workbook leaves it alone. Stop it (`kill {lines[0]}`), then start again."
            )
        pidfile.unlink(missing_ok=True)
    for lock in socket_locks(data, socket_dir):
        with contextlib.suppress(OSError):
            if lock_holder_alive(lock.read_text().splitlines()) is False:
                lock.unlink(missing_ok=True)
                Path(str(lock).removesuffix(".lock")).unlink(missing_ok=True)  # its socket
