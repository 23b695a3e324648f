"""Process utilities shared by the servers, the runner and the labs: is a pid alive, a free port, die with the parent."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def alive(pid: int | None) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In a child process (``preexec_fn``): receive SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    Call it after any user switch: setuid resets the death signal.
    """
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def proc_cwd(pid: int) -> str | None:
    """The working folder of ``pid``, or None (gone, a zombie, or another user's)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, str, float] | None:
    """(state letter, command name, start time in seconds since the epoch) of a process, None when gone.

    A zombie (state ``Z``: dead, not yet reaped by its parent) keeps its pid, name and start time, but
    has no open files, memory or working folder any more."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], comm, btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
