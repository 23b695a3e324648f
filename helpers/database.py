"""Where the workbook database is, and engines on it.

``DATABASE_URL`` wins (docker-compose, a team server, a managed Postgres); otherwise the
embedded server is started. ``WORKBOOK_DB`` replaces the database name in either case, so
trainees sharing one server each get a database of their own.
"""

from __future__ import annotations

import functools
import os

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url

from . import server
from .config import WorkbookError, settings


def _normalise(url: URL) -> URL:
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        url = url.set(drivername="postgresql+psycopg")
    else:
        raise WorkbookError(
            f"DATABASE_URL uses the driver {url.drivername!r}; the workbook needs PostgreSQL through psycopg 3: "
            "postgresql+psycopg://user:password@host:5432/dbname"
        )
    return url


def is_embedded() -> bool:
    """True when the workbook runs on its embedded server (no ``DATABASE_URL``)."""
    return settings().database_url is None


def masked(url: URL | str) -> str:
    url = make_url(url) if isinstance(url, str) else url
    return url.render_as_string(hide_password=True)


@functools.cache
def _database_url_cached(database_url: str | None, db_name: str) -> URL:
    if database_url is None:
        info = server.start()
        url = make_url(server.superuser_url(db_name, info))
        _ensure_database(url)
        return url
    try:
        url = make_url(database_url)
    except Exception:  # noqa: BLE001 - any parse error gets the same advice
        raise WorkbookError(
            "DATABASE_URL is not a URL SQLAlchemy can read. Expected a form like "
            "postgresql+psycopg://user:password@localhost:5432/workbook"
        ) from None
    url = _normalise(url)
    if "WORKBOOK_DB" in __import__("os").environ:
        url = url.set(database=db_name)
    check_connection(url)
    return url


_last_url: URL | None = None  # what database_url() last returned (read by helpers.kernel, never starts anything)


def database_url() -> URL:
    """The SQLAlchemy URL of the workbook database; starts the embedded server if needed."""
    global _last_url
    s = settings()
    _last_url = _database_url_cached(s.database_url, s.db_name)
    return _last_url


def last_url() -> URL | None:
    """The URL ``database_url()`` last returned in this process, or None (no server started, no connection tried)."""
    return _last_url


def libpq_kwargs(url: URL) -> dict:
    """Keyword arguments for ``psycopg.connect`` to ``url`` (host, port, user, password, dbname, options)."""
    kw = {
        "host": url.host or "localhost",
        "port": url.port or 5432,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        "connect_timeout": 5,
    }
    kw.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    return {k: v for k, v in kw.items() if v is not None}


def libpq_tool_args(url: URL) -> tuple[str, dict[str, str]]:
    """How to point a libpq command-line tool (psql, pgbench) at ``url``: a connection string for its
    database argument, and an environment carrying the password. ``ps`` shows command lines to every
    user of the machine, a process's environment only to its owner."""
    kw = libpq_kwargs(url)
    password = kw.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return make_conninfo(**kw), env


def _tcp_answers(host: str, port: str) -> bool:
    """True when something accepts a TCP connection at host:port (whatever it is)."""
    import socket

    if host.startswith("/") or "," in host or not port.isdigit():
        return False  # a unix socket folder or several hosts: libpq's own message says what is wrong
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


DATABASE_LOCK_WAIT = 600  # seconds a connection waits behind a copy of its database (minutes at `large`)

# A session holding one of these on a database's object (CREATE DATABASE ... TEMPLATE it, ALTER
# DATABASE) makes every new connection to that database wait in its startup, as a lock wait.
_CONNECT_BLOCKING = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")


def database_lock_holder(url: URL) -> tuple[int, str] | None:
    """``(pid, what it runs)`` of a session whose lock on ``url``'s database holds new connections back, or None.

    Asked through the ``postgres`` database, which that lock does not hold back.
    """
    if url.database in (None, "postgres"):
        return None
    try:
        with psycopg.connect(**libpq_kwargs(url.set(database="postgres")), autocommit=True) as conn:
            row = conn.execute(
                "SELECT l.pid, coalesce(nullif(a.query, ''), a.backend_type, '?') FROM pg_locks l "
                "JOIN pg_database d ON d.oid = l.objid "
                "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'object' AND l.classid = 'pg_database'::regclass AND l.granted "
                "AND l.mode = ANY(%s) AND d.datname = %s ORDER BY l.pid LIMIT 1",
                (list(_CONNECT_BLOCKING), url.database),
            ).fetchone()
    except psycopg.Error:
        return None
    return (int(row[0]), " ".join(str(row[1]).split())[:160]) if row else None


def _connect_behind_lock(url: URL, kw: dict, limit: float) -> bool:
    """After a connect timed out: while a session's lock on the database holds connections back, keep
    connecting (bounded by ``limit`` seconds); True once connected, False when no such lock is held.

    A second learner's kernel connecting while the first one copies the seeded database into the
    clones' template waits for that copy, as PostgreSQL makes it; it is not a dead server.
    """
    import time

    deadline = time.monotonic() + limit
    holder = database_lock_holder(url)
    saw_a_holder = holder is not None
    while holder is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkbookError(
                f"Waited {limit:.0f} s to connect to {masked(url)}: session {holder[0]} holds a lock on that "
                f"database that keeps new connections out (it runs: {holder[1]}). Let it finish, or end it "
                f"with SELECT pg_terminate_backend({holder[0]}) from another database, then run the cell again."
            )
        try:
            with psycopg.connect(**dict(kw, connect_timeout=max(2, min(30, int(left))))):
                return True
        except psycopg.OperationalError as exc:
            if "timeout expired" not in str(exc).lower():
                return False  # another failure: check_connection's advice says what to do
        holder = database_lock_holder(url)
    if saw_a_holder:  # the lock went away between the timeout and the question: connect once more
        try:
            with psycopg.connect(**kw):
                return True
        except psycopg.OperationalError:
            return False
    return False


def check_connection(url: URL) -> None:
    """Connect once and turn the usual failures into one paragraph saying what to do.

    A connect that times out because another session's lock on the database holds it back (a copy
    of the database in progress) waits for that session, at most ``DATABASE_LOCK_WAIT`` seconds.
    """
    where = masked(url)
    kw = libpq_kwargs(url)
    try:
        with psycopg.connect(**kw):
            return
    except psycopg.OperationalError as exc:
        if "timeout expired" in str(exc).lower() and _connect_behind_lock(url, kw, DATABASE_LOCK_WAIT):
            return
        text = str(exc).strip()
        msg = text.splitlines()[0] if text else repr(exc)
        low = text.lower()
        host, port = str(kw["host"]), str(kw["port"])
        if "password authentication failed" in low or "no password supplied" in low:
            advice = "the user name or password is wrong. Check the credentials in DATABASE_URL."
        elif "does not exist" in low and "database" in low:
            advice = (
                f"the database {url.database!r} does not exist on that server. Create it "
                f"(`createdb {url.database}` or CREATE DATABASE) or point WORKBOOK_DB at one you own."
            )
        elif "failed to resolve host" in low or "could not translate host name" in low:
            advice = (
                f"the host name {host!r} does not resolve on this machine. Fix the host in DATABASE_URL "
                "(a docker-compose service name resolves only inside its network: from here use localhost)."
            )
        elif _tcp_answers(host, port):
            advice = (
                f"a program listens on {host}:{port}, but it did not answer as a PostgreSQL server. Check the "
                "port in DATABASE_URL (PostgreSQL's default is 5432) and that the server there is PostgreSQL."
            )
        elif "connection refused" in low or "could not connect" in low or "timeout" in low or "no route" in low:
            advice = (
                "nothing answers there. Start that server (for docker-compose: `docker compose up -d`), "
                "fix host/port in DATABASE_URL, or unset DATABASE_URL to use the embedded server."
            )
        else:
            advice = "check that DATABASE_URL names a PostgreSQL server this user may connect to."
        raise WorkbookError(f"Cannot connect to {where}: {msg} -- {advice}") from None


def _ensure_database(url: URL) -> None:
    """Create the workbook database on the embedded server when it is missing."""
    admin = url.set(database="postgres")
    with psycopg.connect(**libpq_kwargs(admin), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
            except psycopg.errors.DuplicateDatabase:
                pass


_engines: dict[str, Engine] = {}


def get_engine() -> Engine:
    """The shared Engine on the workbook database (one per process)."""
    url = database_url()
    key = url.render_as_string(hide_password=False)
    if key not in _engines:
        _engines[key] = create_engine(url, pool_size=5, max_overflow=10)
    return _engines[key]


def reconnect() -> Engine:
    """Find the workbook database afresh and drop the pooled connections of a server that stopped.

    ``database_url()`` is remembered per process, and a pool keeps its connections: after
    ``make db-stop`` (or a crash) both point at a server that is gone. This forgets the URL, starts
    the embedded server again when it is down (on the port it recorded, so the URL is the same), and
    disposes the pool of every shared Engine. The Engine object stays the same while the URL does,
    so a learner's ``engine`` variable works again; a new Engine only when the server came back on
    another port (``setup()`` says so).
    """
    _database_url_cached.cache_clear()
    engine = get_engine()
    for eng in _engines.values():  # dead connections; checked-out ones are discarded when returned
        eng.dispose()
    return engine


def make_engine(database: str | None = None, **kw) -> Engine:
    """A new Engine on the workbook database (or ``database`` on the same server) with other options.

    Examples: ``make_engine(poolclass=NullPool)``, ``make_engine(isolation_level="SERIALIZABLE")``,
    ``make_engine(echo=True)``. The caller owns it: ``engine.dispose()`` when done.
    """
    url = database_url()
    if database:
        url = url.set(database=database)
    return create_engine(url, **kw)


def psycopg_conninfo(database: str | None = None) -> dict:
    """Keyword arguments for ``psycopg.connect`` on the workbook database (raw driver demos, COPY)."""
    url = database_url()
    if database:
        url = url.set(database=database)
    return libpq_kwargs(url)


def socket_url(database: str | None = None) -> URL | None:
    """The same database over the embedded server's unix socket (None when DATABASE_URL is used)."""
    if not is_embedded():
        return None
    info = server.status()
    url = database_url()
    return URL.create(
        "postgresql+psycopg",
        username=url.username,
        password=url.password,
        database=database or url.database,
        query={"host": info.socket_dir, "port": str(info.port)},
    )


CLONE_COMMENT = "qo-workbook clone"  # the stamp of every scratch database (helpers.scratchdb) and the template


def _create_extension(name: str) -> sql.Composed:
    return sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name))


def try_create_extension(engine: Engine, name: str) -> bool:
    """``CREATE EXTENSION IF NOT EXISTS name``; False (nothing raised) when this role may not."""

    with engine.begin() as conn:
        try:
            with conn.begin_nested():
                conn.connection.driver_connection.execute(_create_extension(name))
            return True
        except Exception:  # noqa: BLE001 - not superuser on a shared server: chapters check and explain
            return False


_PRELOADED = {"pg_stat_statements", "auto_explain"}


def require_extension(engine: Engine, name: str) -> None:
    """Make sure extension ``name`` is usable in the workbook database, or say what to do.

    Creates it when missing (``CREATE EXTENSION IF NOT EXISTS``); ``auto_explain`` is a library
    only, checked in ``shared_preload_libraries``.
    """
    from sqlalchemy import text

    where = masked(engine.url)
    with engine.connect() as conn:
        try:
            with conn.begin_nested():
                preload = conn.execute(text("SHOW shared_preload_libraries")).scalar() or ""
        except Exception:  # noqa: BLE001 - without pg_read_all_settings the setting is hidden
            preload = None
        if preload is not None and name in _PRELOADED and name not in [p.strip() for p in preload.split(",")]:
            raise WorkbookError(
                f"{name} is not loaded on {where}: it must be in shared_preload_libraries (now {preload!r}). "
                f"Add it (postgresql.conf or `-c shared_preload_libraries=pg_stat_statements,auto_explain`, as "
                "docker-compose.yml does) and restart that server, or unset DATABASE_URL to use the embedded one."
            )
        if name == "auto_explain":
            return
        available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = :n"), {"n": name}).scalar()
        if not available:
            raise WorkbookError(
                f"The extension {name!r} is not available on this server ({where}): its files are not installed. "
                "Install the server's contrib package (e.g. postgresql-contrib), or use the embedded server, "
                "which ships it."
            )
        installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = :n"), {"n": name}).scalar()
        if installed:
            return
        try:
            conn.connection.driver_connection.execute(_create_extension(name))  # name checked against the catalog
            conn.commit()
        except Exception as exc:  # noqa: BLE001
            raise WorkbookError(
                f"Cannot create the extension {name!r} in {where}: {str(exc).splitlines()[0]}. Ask the server's "
                f"administrator to run CREATE EXTENSION {name} in this database."
            ) from None
