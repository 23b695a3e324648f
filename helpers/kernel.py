"""A lost connection to the workbook database, shown in a notebook as one paragraph.

When the server stops under a running kernel (``make db-stop``, a reboot, a crash), every cell
that touches the database used to print 11 to 18 thousand characters of traceback ending in
``Connection refused``. ``setup()`` calls ``install()``: inside IPython, an ``OperationalError``
(SQLAlchemy's or psycopg's) that is a lost or refused connection to the workbook's own server is
shown as one paragraph: the cause (the driver's first line) and what to do (``engine = setup()``
restarts the embedded server and drops the dead pooled connections). Every other error keeps
IPython's usual traceback, and the cell still fails (the kernel's reply says ``error``), so
nbmake and ``helpers run`` stop there.
"""

from __future__ import annotations

import sys

# Connection-level SQLSTATEs: class 08 (connection exception), and the server shutting the session down.
_SHUTDOWN_STATES = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now


def install() -> bool:
    """Register the short display in the running IPython shell; False outside IPython (nothing done)."""
    if "IPython" not in sys.modules:  # a plain script or a test: never import IPython for this
        return False
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return False
    import psycopg
    import sqlalchemy.exc

    shell.set_custom_exc((sqlalchemy.exc.OperationalError, psycopg.OperationalError), _display)
    return True


def _display(shell, etype, value, tb, tb_offset=None):
    """IPython's custom exception handler: the short paragraph, or the usual traceback for anything else.

    IPython ignores what a custom handler returns (it only marks the cell as failed), so both paths
    publish the error themselves, as IPython's own ``showtraceback`` does.
    """
    try:
        message = connection_message(value, tb)
    except Exception:  # noqa: BLE001 - a bug here must never hide the user's error
        message = None
    if message is None:
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return None
    stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {message}"]
    shell._showtraceback(etype, value, stb)
    return stb


def is_connection_loss(exc: BaseException) -> bool:
    """True for a refused, broken or server-ended connection; False for errors of a statement
    (timeouts, lock waits, deadlocks are OperationalErrors too and keep their traceback)."""
    if getattr(exc, "connection_invalidated", False):
        return True
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None)
    if state is None:  # raised by libpq itself: connect failed, connection closed or broken
        import psycopg

        return isinstance(orig, psycopg.OperationalError)
    return state.startswith("08") or state in _SHUTDOWN_STATES


def _endpoint(exc: BaseException, tb) -> tuple[str, int] | None:
    """(host, port) of the connection that failed: from the failed libpq connection, else from the
    SQLAlchemy or psycopg connection found in the traceback's frames (innermost first)."""
    orig = getattr(exc, "orig", None) or exc
    pgconn = getattr(orig, "pgconn", None)
    found = _pgconn_endpoint(pgconn)
    if found:
        return found
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    from sqlalchemy.engine import Connection, Engine

    for frame in reversed(frames):
        obj = frame.f_locals.get("self")
        url = None
        if isinstance(obj, Connection):
            url = obj.engine.url
        elif isinstance(obj, Engine):
            url = obj.url
        elif hasattr(obj, "pgconn"):  # a psycopg Connection or Cursor
            found = _pgconn_endpoint(getattr(obj, "pgconn", None))
            if found:
                return found
        if url is not None and url.port:
            return (url.host or "localhost", int(url.port))
    return None


def _pgconn_endpoint(pgconn) -> tuple[str, int] | None:
    try:
        host, port = pgconn.host, pgconn.port
    except Exception:  # noqa: BLE001 - None, or a connection already finished
        return None
    if not host or not port:
        return None
    return (host.decode(), int(port.decode()))


def connection_message(exc: BaseException, tb=None) -> str | None:
    """The paragraph for a lost connection to the workbook's server, or None (not such an error)."""
    if not is_connection_loss(exc):
        return None
    from .database import is_embedded, last_url, masked

    url = last_url()
    if url is None:
        return None
    target = _endpoint(exc, tb)
    port = int(url.port or 5432)
    if (
        target is None
        or target[1] != port
        or (target[0] != (url.host or "localhost") and not target[0].startswith("/"))
    ):
        return None  # another server (a throwaway, a proxy of a chapter): the usual traceback
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    cause = lines[0] if lines else type(orig).__name__
    where = masked(url)
    if is_embedded():
        running = _embedded_running()
        state = {
            True: "The embedded server is running again (or the session was ended by pg_terminate_backend). ",
            False: "The embedded server is not running. ",
            None: "",
        }[running]
        todo = (
            "Run `engine = setup()` (it restarts the embedded server and drops the dead pooled connections), "
            "or `make db-start` in a terminal, then re-run this cell."
        )
    else:
        state = ""
        todo = (
            "If that server stopped, start it again (docker-compose: `docker compose up -d`); then run "
            "`engine = setup()`, which drops the dead pooled connections, and re-run this cell."
        )
    return f"Lost the connection to the workbook database {where}: {cause}. {state}{todo}"


def _embedded_running() -> bool | None:
    try:
        from . import server

        return server.status().running
    except Exception:  # noqa: BLE001 - the sentence is left out when the state cannot be read
        return None
