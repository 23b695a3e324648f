"""Bounded waits: every lock the workbook waits for has a limit, and when it expires the blocker is named.

``bounded(conn)`` sets ``lock_timeout`` (and optionally ``statement_timeout``) with
``SELECT set_config(name, value, true)``: bound parameters, local to the current transaction.
When a statement inside gives up (SQLSTATE 55P03 lock timeout, or 57014 statement timeout),
it raises ``LockWaitTimeout`` (a ``WorkbookError``: a short message) naming every session that
blocked it (pid, application_name, state, when its transaction and query started, the start of
its query) and how to end it. The caller's transaction then rolls back: nothing it did is kept.

Naming the blocker is the hard part: once the timeout fires, the waiting backend no longer waits,
so ``pg_blocking_pids(pid)`` is empty, and the error itself names no relation. The blockers are
therefore sampled *while* the wait lasts: a watcher thread, started only when the block is still
running after a short grace period (so fast blocks never open a second connection), polls
``pg_blocking_pids`` of this backend from a connection of its own every 50 ms and keeps the last
non-empty answer. A lock wait that reaches its timeout lasts the whole timeout (at least several
hundred ms), long enough for many samples, so the answer does not depend on timing luck.

The default limit is 5 s; ``WORKBOOK_LOCK_TIMEOUT`` (a PostgreSQL duration such as ``2s``) changes it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text

from .config import WorkbookError

DEFAULT_LOCK_TIMEOUT = "5s"
_GRACE_S = 0.1  # blocks shorter than this never open the watcher's connection
_POLL_S = 0.05

_BLOCKERS_SQL = """
SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''), a.usename,
       to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS TZ'), to_char(a.query_start, 'YYYY-MM-DD HH24:MI:SS TZ'),
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80)
FROM unnest(pg_blocking_pids(%s)) AS b(pid) JOIN pg_stat_activity a ON a.pid = b.pid
ORDER BY a.pid
"""


class LockWaitTimeout(WorkbookError):
    """A bounded wait expired; ``blockers`` lists the sessions that held the lock."""

    def __init__(self, message: str, blockers: list[Blocker]):
        super().__init__(message)
        self.blockers = blockers


@dataclass(frozen=True)
class Blocker:
    pid: int
    application_name: str
    state: str
    user: str | None
    xact_start: str | None
    query_start: str | None
    query: str

    def describe(self) -> str:
        since = f", in a transaction since {self.xact_start}" if self.xact_start else ""
        return (
            f"pid {self.pid} (application_name {self.application_name!r}, user {self.user}, state {self.state!r}"
            f"{since}, query started {self.query_start}: {self.query!r})"
        )


def default_lock_timeout() -> str:
    """The workbook's limit on lock waits: ``WORKBOOK_LOCK_TIMEOUT`` or 5 s."""
    return os.environ.get("WORKBOOK_LOCK_TIMEOUT", "").strip() or DEFAULT_LOCK_TIMEOUT


class _Watcher(threading.Thread):
    """Samples ``pg_blocking_pids(pid)`` from a connection of its own while the block runs."""

    def __init__(self, target, pid: int):
        super().__init__(daemon=True, name=f"qo-workbook wait watcher {pid}")
        self.target, self.pid = target, pid
        self.stop = threading.Event()
        self.blockers: list[Blocker] = []
        self.error: str | None = None

    def run(self) -> None:
        if self.stop.wait(_GRACE_S):
            return
        from .database import libpq_kwargs

        try:
            kwargs = dict(self.target) if isinstance(self.target, dict) else libpq_kwargs(self.target)
            kwargs["application_name"] = "qo-workbook wait watcher"
            kwargs.setdefault("connect_timeout", 5)
            with psycopg.connect(**kwargs, autocommit=True) as conn:
                while not self.stop.is_set():
                    rows = conn.execute(_BLOCKERS_SQL, (self.pid,)).fetchall()
                    if rows:
                        self.blockers = [Blocker(*row) for row in rows]
                    self.stop.wait(_POLL_S)
        except Exception as exc:  # noqa: BLE001 - the watcher only informs: never fail the block because of it
            self.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _timeout_kind(exc: BaseException) -> str | None:
    """'lock' or 'statement' when ``exc`` (or the driver error it wraps) is a timeout, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException):
            exc = orig
            continue
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return "lock"
        if isinstance(exc, psycopg.errors.QueryCanceled):
            primary = getattr(exc.diag, "message_primary", "") or ""
            # "due to user request" (pg_cancel_backend, Ctrl-C) is not a timeout
            return "statement" if "statement timeout" in primary else None
        exc = exc.__cause__
    return None


class _Conn:
    """One interface over a SQLAlchemy Connection or Session, or a psycopg Connection."""

    def __init__(self, conn):
        from sqlalchemy.orm import Session

        if isinstance(conn, Session):
            conn = conn.connection()  # the Connection of the session's transaction
        self.conn = conn
        self.raw = isinstance(conn, psycopg.Connection)

    def scalar(self, query: str, params: dict):
        if self.raw:
            return self.conn.execute(re.sub(r":(\w+)", r"%(\1)s", query), params).fetchone()[0]
        return self.conn.execute(text(query), params).scalar()

    def in_transaction(self) -> bool:
        if self.raw:
            return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        return self.conn.in_transaction()

    def commit(self) -> None:
        self.conn.commit()

    def watcher_target(self):
        """What the watcher connects with: a SQLAlchemy URL, or psycopg keyword arguments."""
        if not self.raw:
            return self.conn.engine.url
        kwargs = conninfo_to_dict(self.conn.info.dsn)
        if self.conn.info.password:
            kwargs["password"] = self.conn.info.password
        return kwargs


@contextmanager
def bounded(
    conn,
    what: str = "the workbook",
    *,
    lock_timeout: str | None = None,
    statement_timeout: str | None = None,
    session: bool = False,
) -> Iterator[None]:
    """Bound every wait of the statements run inside on ``conn``: a SQLAlchemy Connection or ORM
    Session, or a psycopg Connection.

    ``lock_timeout`` (default: ``default_lock_timeout()``, 5 s) and ``statement_timeout`` (default: none)
    are set with ``set_config(..., true)``, local to the current transaction; ``session=True``
    sets them for the session instead (a connection whose transactions begin and end inside,
    such as Alembic's per-revision ones) and restores the previous values on exit.
    When a wait expires, raises ``LockWaitTimeout`` naming ``what`` and each blocking session,
    and saying how to end it. Use it inside the transaction it bounds::

        with engine.begin() as conn, bounded(conn, "dropping my table"):
            conn.execute(text("DROP TABLE IF EXISTS wb_topic.t"))
    """
    c = _Conn(conn)
    if c.raw and conn.autocommit:
        session = True  # every statement is its own transaction: a transaction-local setting would not last
    limit = lock_timeout or default_lock_timeout()
    settings = {"lock_timeout": limit}
    if statement_timeout:
        settings["statement_timeout"] = statement_timeout
    outside = session and not c.in_transaction()  # then the session settings commit on their own
    pid = c.scalar("SELECT pg_backend_pid()", {})
    previous = {}
    if session:
        previous = {k: c.scalar("SELECT current_setting(:k)", {"k": k}) for k in settings}
    for name, value in settings.items():
        c.scalar("SELECT set_config(:k, :v, :local)", {"k": name, "v": value, "local": not session})
    if outside:
        c.commit()
    watcher = _Watcher(c.watcher_target(), pid)
    watcher.start()
    try:
        yield
    except Exception as exc:
        kind = _timeout_kind(exc)
        if kind is None:
            raise
        watcher.stop.set()
        watcher.join()
        raise LockWaitTimeout(_message(what, kind, settings, watcher), watcher.blockers) from None
    finally:
        watcher.stop.set()
        watcher.join()
    if session:
        for name, value in previous.items():
            c.scalar("SELECT set_config(:k, :v, false)", {"k": name, "v": value})
        if outside:
            c.commit()


def _message(what: str, kind: str, settings: dict[str, str], watcher: _Watcher) -> str:
    if kind == "lock":
        head = (
            f"{what} waited {settings['lock_timeout']} for a lock held by another session and gave up (lock_timeout)."
        )
    else:
        head = f"{what} ran longer than statement_timeout ({settings['statement_timeout']}) and was cancelled."
    lines = [head + " Its transaction was rolled back."]
    if watcher.blockers:
        lines.append("Blocked by " + "; ".join(b.describe() for b in watcher.blockers) + ".")
        ends = " ".join(f"SELECT pg_terminate_backend({b.pid});" for b in watcher.blockers)
        lines.append(f"End it: finish that session's transaction (COMMIT or ROLLBACK), or run {ends} Then try again.")
    elif kind == "lock":
        why = f" (the watcher could not look: {watcher.error})" if watcher.error else ""
        lines.append(
            f"The blocking session had already gone when the wait ended{why}. "
            "Look for sessions `idle in transaction` in pg_stat_activity, end them, and try again."
        )
    return "\n".join(lines)
