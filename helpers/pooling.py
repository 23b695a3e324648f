"""Connection pools, measured: status, events, health, the server's limits, a throwaway server (Prometheus: ``helpers.exporter``).

Everything here reads a SQLAlchemy ``Engine``'s pool or the server's connection limits; nothing
prints. The connection-pooling chapters (``notebooks/05a_pool_basics_and_sizing.ipynb``,
``notebooks/05b_pools_in_production.ipynb``) show the code that teaches; this module holds the
instruments around it. The closed-loop load of the sizing lab is ``helpers.poolload``; the child
process that fills a throwaway server is ``helpers.too_many_clients`` (``python -m``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import pandas as pd
import psycopg
from psycopg import sql
from sqlalchemy import Engine, event, text

from .config import REPO_ROOT, WorkbookError
from .database import database_url, psycopg_conninfo
from .processes import alive, die_with_parent
from .too_many_clients import THROWAWAY_PREFIX  # the child refuses any other folder

ROLE_PREFIX = "wb_pool_limited_"


# ----------------------------------------------------------------------------- status and health
@dataclass(frozen=True)
class PoolStatus:
    """What a pool holds right now; ``capacity`` is pool_size + max_overflow (None when unbounded)."""

    pool_class: str
    size: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None
    capacity: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def pool_status(engine: Engine) -> PoolStatus:
    """Size, checked-in, checked-out and overflow of ``engine``'s pool (None where the pool has no such figure)."""
    pool = engine.pool
    name = type(pool).__name__
    if not hasattr(pool, "checkedout"):
        return PoolStatus(name, None, None, None, None, None)
    size, overflow = pool.size(), pool.overflow()
    max_overflow = getattr(pool, "_max_overflow", 0)
    capacity = None if max_overflow < 0 else size + max_overflow
    return PoolStatus(name, size, pool.checkedin(), pool.checkedout(), overflow, capacity)


@dataclass(frozen=True)
class HealthReport:
    """Result of ``health_check``: status ``ok`` / ``saturated`` / ``down``, round-trip latency, pool figures."""

    status: str
    latency_ms: float | None
    error: str | None
    pool: dict

    def as_dict(self) -> dict:
        return asdict(self)


def health_check(engine: Engine, *, timeout_ms: int = 1000) -> HealthReport:
    """One bounded ``SELECT 1`` through the pool; a saturated pool is reported without waiting for a checkout."""
    status = pool_status(engine)
    if status.capacity is not None and status.checked_out >= status.capacity:
        return HealthReport("saturated", None, "every pooled connection is checked out", status.as_dict())
    t0 = time.perf_counter()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT set_config('statement_timeout', :v, true)"), {"v": f"{int(timeout_ms)}ms"})
            conn.execute(text("SELECT 1")).scalar_one()
            conn.rollback()
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure as "down"
        return HealthReport("down", None, error_summary(exc)["message"], pool_status(engine).as_dict())
    latency = (time.perf_counter() - t0) * 1000
    return HealthReport("ok", round(latency, 3), None, pool_status(engine).as_dict())


def error_summary(exc: BaseException) -> dict:
    """Class, SQLSTATE and first message line of an exception (the DBAPI error under SQLAlchemy's wrapper)."""
    orig = getattr(exc, "orig", None) or exc
    text_ = str(orig).strip()
    if "FATAL:" in text_:  # connection refusals: keep the server's words, not libpq's preamble
        text_ = text_.rsplit("FATAL:", 1)[1].strip()
    message = text_.splitlines()[0] if text_ else type(orig).__name__
    return {
        "error": type(exc).__name__,
        "driver_error": type(orig).__name__ if orig is not exc else None,
        "sqlstate": getattr(orig, "sqlstate", None),
        "message": message,
    }


# ----------------------------------------------------------------------------- events
POOL_EVENTS = ("connect", "checkout", "checkin", "invalidate", "soft_invalidate", "close", "detach")


class PoolEventLog:
    """Pool events kept in memory: each listener appends one tuple to a bounded deque and bumps a counter.

    No formatting, no I/O and no logging call on the hot path; ``.df`` formats later, off it.
    """

    def __init__(self, engine: Engine, *, maxlen: int = 10_000, events: tuple[str, ...] = POOL_EVENTS):
        self.engine = engine
        self.events: deque = deque(maxlen=maxlen)
        self._counts = dict.fromkeys(events, 0)
        self._lock = threading.Lock()
        self._listeners = {name: self._listener(name) for name in events}
        for name, fn in self._listeners.items():
            event.listen(engine, name, fn)

    def _listener(self, name: str):
        append, clock, lock, counts = self.events.append, time.perf_counter_ns, self._lock, self._counts

        def on_event(dbapi_connection, *_args):
            append((clock(), name, id(dbapi_connection)))
            with lock:
                counts[name] += 1

        return on_event

    def counts(self) -> dict:
        """Events seen so far, by name (not limited by ``maxlen``)."""
        with self._lock:
            return dict(self._counts)

    @property
    def df(self) -> pd.DataFrame:
        """The retained events: t_ms (since the first), event, conn (a short id of the DBAPI connection)."""
        rows = list(self.events)
        if not rows:
            return pd.DataFrame(columns=["t_ms", "event", "conn"])
        t0 = rows[0][0]
        ids = {c: f"c{i}" for i, c in enumerate(dict.fromkeys(r[2] for r in rows))}
        return pd.DataFrame([{"t_ms": (t - t0) / 1e6, "event": e, "conn": ids[c]} for t, e, c in rows])

    def close(self) -> None:
        """Remove the listeners."""
        for name, fn in self._listeners.items():
            if event.contains(self.engine, name, fn):
                event.remove(self.engine, name, fn)


# Prometheus: the pool collector and chapter 05's pool_metrics / metrics_text / parse_metrics are in
# helpers/exporter.py, the one exporter chapters 05 and 09 share.


# ----------------------------------------------------------------------------- server limits
def connection_budget(engine: Engine) -> dict:
    """max_connections, the reserved slots, connections in use now, and what is left for non-superusers."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int, "
                "coalesce(current_setting('reserved_connections', true), '0')::int, "
                "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
        ).one()
    max_c, su_reserved, reserved, in_use = row
    return {
        "max_connections": max_c,
        "superuser_reserved_connections": su_reserved,
        "reserved_connections": reserved,
        "client_backends_now": in_use,
        "for_applications": max_c - su_reserved - reserved,
        "free_now": max_c - su_reserved - reserved - in_use,
    }


def terminate_backends(engine: Engine, application_name: str) -> int:
    """pg_terminate_backend on the backends carrying ``application_name`` (ours only); waits until they are gone."""
    if not application_name.startswith("wb_pool"):
        raise ValueError("only backends of this chapter (application_name wb_pool...) may be terminated")
    with engine.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE application_name = :app AND pid <> pg_backend_pid()"
            ),
            {"app": application_name},
        ).scalar_one()
        conn.commit()
    return int(n)


@contextlib.contextmanager
def limited_role(limit: int = 2):
    """A LOGIN role of this kernel's own with CONNECTION LIMIT ``limit``; yields its URL; drops it afterwards.

    Named ``wb_pool_limited_<kernel>`` (``helpers.scratch``: roles are server-wide, so two trainees'
    kernels must not share one), stamped, and dropped only as the role this process created. A killed
    kernel's role is removed by ``python -m helpers reset``.
    """
    from .scratch import create_role, drop_role

    pw = secrets.token_urlsafe(16)
    conninfo = psycopg_conninfo()
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        name = create_role(
            conn,
            ROLE_PREFIX.rstrip("_"),
            sql.SQL("LOGIN NOSUPERUSER CONNECTION LIMIT {} PASSWORD {}").format(sql.Literal(limit), sql.Literal(pw)),
        )
    try:
        yield database_url().set(username=name, password=pw)
    finally:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (name,))
            drop_role(conn, name)


# ----------------------------------------------------------------------------- a throwaway server of our own
class TooManyClients:
    """The throwaway-server demo running in the background: ``.result()`` waits for it (bounded)."""

    def __init__(self, max_connections: int = 6, superuser_reserved: int = 3, timeout_s: float = 120):
        with contextlib.suppress(OSError):
            reap_throwaways(wait_s=0)  # folders of kernels that died mid-demo (their owner is gone)
        self.state = tempfile.mkdtemp(prefix=THROWAWAY_PREFIX)
        os.chmod(self.state, 0o755)
        _write_owner(self.state, child=None)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WORKBOOK_PORT")}
        env["WORKBOOK_STATE"] = self.state
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.env, self.timeout_s, self.t0 = env, timeout_s, time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "helpers.too_many_clients", str(max_connections), str(superuser_reserved)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO_ROOT),
            preexec_fn=_nice_and_die_with_parent,
        )
        _write_owner(self.state, child=self.process.pid)

    def result(self) -> dict:
        """What the throwaway server said (its folder is removed and its server stopped before this returns)."""
        try:
            out, err = self.process.communicate(timeout=max(1.0, self.timeout_s - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.process.terminate()
            out, err = self.process.communicate(timeout=30)
        finally:
            _stop_leftover(self.state, self.env)
            shutil.rmtree(self.state, ignore_errors=True)
        if self.process.returncode != 0:
            raise WorkbookError(f"The throwaway server demo failed: {err.strip()[-800:]}")
        data = json.loads(out.strip().splitlines()[-1])
        data["seconds"] = round(time.perf_counter() - self.t0, 1)
        return data


def too_many_clients(max_connections: int = 6, superuser_reserved: int = 3, timeout_s: float = 120) -> dict:
    """Fill a throwaway embedded server (own data folder, own port) until PostgreSQL refuses; return what it said.

    Runs in a subprocess with ``WORKBOOK_STATE`` on a temp folder, so the shared server is never touched;
    the throwaway server is stopped and its folder removed before this returns. ``TooManyClients(...)``
    starts the same in the background.
    """
    return TooManyClients(max_connections, superuser_reserved, timeout_s).result()


def _nice_and_die_with_parent() -> None:
    """In the child: lowest CPU priority (it runs beside measurements), SIGTERM when the parent dies."""
    os.nice(19)
    die_with_parent()


def _stop_leftover(state: str, env: dict) -> None:
    """If the subprocess died before stopping its server, stop it now (it lives in our temp folder)."""
    if not os.path.isdir(state):
        return
    for pidfile in (os.path.join(state, d, "data", "postmaster.pid") for d in os.listdir(state) if d.startswith("pg")):
        if os.path.exists(pidfile):
            subprocess.run(
                [sys.executable, "-c", "from helpers import server; server.stop()"],
                env=env,
                cwd=str(REPO_ROOT),
                capture_output=True,
                timeout=60,
            )


# ----------------------------------------------------------------------------- leftovers of a dead kernel
OWNER_FILE = "owner.json"
_OWNER_MARK = "qo-workbook throwaway server"


def _write_owner(state: str, child: int | None) -> None:
    """Record who made this folder (this process) and the demo's subprocess, for ``reap_throwaways``."""
    tmp = os.path.join(state, OWNER_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"mark": _OWNER_MARK, "owner": os.getpid(), "child": child}, fh)
    os.replace(tmp, os.path.join(state, OWNER_FILE))


def _runs_in_env(pid: int, variable: str, value: str) -> bool:
    """True when process ``pid`` was started with ``variable=value`` (proof that a recorded pid is still
    the process we started, not a stranger that got the number since)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{variable}={value}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _processes_in(folder: str) -> list[int]:
    """Processes whose working directory is ``folder`` or below: the throwaway's initdb, pg_ctl,
    postmaster and backends all run there (a folder already deleted reads as ``... (deleted)``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        cwd = cwd.removesuffix(" (deleted)")
        if (cwd == folder or cwd.startswith(folder + os.sep)) and alive(int(entry)):
            found.append(int(entry))
    return found


def _wait_gone(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def reap_throwaways(owner_pid: int | None = None, *, wait_s: float = 60) -> list[str]:
    """Stop and remove throwaway servers whose owner process is gone; returns the folders removed.

    A folder qualifies only by proof: it is named ``wb-pool-*`` in the temp folder, holds the
    ``owner.json`` that ``TooManyClients`` wrote, and its owner (the kernel that made it) is dead;
    with ``owner_pid``, only folders of that owner. Its demo subprocess gets ``wait_s`` seconds to
    finish its own cleanup (it is told by SIGTERM when its kernel dies), then SIGTERM, and is skipped
    while it still runs. Then every process working inside the folder (a server half started or
    half stopped, an initdb) gets SIGINT (PostgreSQL's fast shutdown), SIGKILL after 15 s, and the
    folder is removed. ``helpers run`` calls this for each notebook's kernel once it is gone.
    """
    removed = []
    root = tempfile.gettempdir()
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not name.startswith(THROWAWAY_PREFIX) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, OWNER_FILE)) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            continue  # no proof whose it is (or removed meanwhile): left alone
        if not isinstance(owner, dict) or owner.get("mark") != _OWNER_MARK:
            continue
        pid, child = owner.get("owner"), owner.get("child")
        if not isinstance(pid, int) or (owner_pid is not None and pid != owner_pid) or alive(pid):
            continue
        child = child if isinstance(child, int) and _runs_in_env(child, "WORKBOOK_STATE", folder) else None
        if child and not _wait_gone([child], wait_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGTERM)
            if not _wait_gone([child], min(wait_s, 30)):
                continue
        leftovers = _processes_in(folder)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGINT)
        if not _wait_gone(leftovers, 15):
            for p in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            _wait_gone(leftovers, 5)
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(folder):
                continue
            removed.append(folder)
    return removed
