"""Watching database work in production: slow-query logging, per-request metrics, pg_stat_* readers.

* The slow-query log done right is chapter 09's own code, in its cells (tagged ``lesson-slow-query-log``).
* ``DoubleExecutingTimer``: the widely copied broken variant that calls ``cursor.execute`` inside
  ``before_cursor_execute`` so every statement runs twice; kept to measure the damage.
* ``QueryMetricsMiddleware``: per-request statement count and database time for any WSGI app,
  exposed as ``X-DB-Queries`` / ``X-DB-Time-ms`` response headers; ``wsgi_get`` is a tiny test client.
* ``top_statements`` / ``reset_statements``: pg_stat_statements for one database only.

Prometheus metrics are ``helpers.exporter`` (shared with chapter 05): ``Exporter.observe`` takes the
``RequestStats`` this middleware produces.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session, selectinload

from . import models

LOG = logging.getLogger("helpers.monitoring")


@dataclass
class DoubleExecutingTimer:
    """The broken, widely copied timer: it runs the statement itself inside before_cursor_execute.

    SQLAlchemy then executes the statement again, so every statement reaches the server twice
    (an INSERT inserts twice). ``extra_executions`` counts the hidden executions.
    """

    engine: Engine
    timings: list[float] = field(default_factory=list)
    extra_executions: int = 0

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        if executemany:
            return
        t0 = time.perf_counter()
        cursor.execute(statement, parameters)  # the bug: the driver runs it now, and again after this hook
        self.extra_executions += 1
        self.timings.append(time.perf_counter() - t0)

    def __enter__(self) -> DoubleExecutingTimer:
        event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)


# ----------------------------------------------------------------------------- per-request metrics
ROUTE_KEY = "workbook.route"  # the WSGI environ key an app sets to the route template it matched
UNMATCHED = "<unmatched>"  # the route label of a request no route matched (one label value, not one per URL)


@dataclass
class RequestStats:
    method: str
    path: str
    status: int
    queries: int = 0
    db_time_s: float = 0.0
    wall_s: float = 0.0
    route: str = UNMATCHED  # the route template (bounded cardinality): what metrics are labelled with
    failed_statements: int = 0


_CURRENT: contextvars.ContextVar[RequestStats | None] = contextvars.ContextVar("wb_request_stats", default=None)


class QueryMetricsMiddleware:
    """WSGI middleware: counts the statements and database time of each request; adds response headers.

    Headers ``X-DB-Queries`` and ``X-DB-Time-ms``; ``on_request(stats)`` is called after each request
    (e.g. ``exporter.Exporter.observe``), also when the app raised (status 500, then the error goes on).
    A statement that fails is counted too, and its start time is dropped in ``handle_error`` (SQLAlchemy
    calls no ``after_cursor_execute`` for it), so the per-connection timing stack never leaks. The counters
    live in a ``ContextVar``: each thread (or task) serving a request has its own. The body is buffered so
    the headers can carry the totals.
    """

    _KEY = "wb_request_start"

    def __init__(self, app: Callable, engine: Engine, on_request: Callable[[RequestStats], None] | None = None):
        self.app = app
        self.engine = engine
        self.on_request = on_request
        self._listeners = {
            "before_cursor_execute": self._before,
            "after_cursor_execute": self._after,
            "handle_error": self._error,
        }
        for name, fn in self._listeners.items():
            event.listen(engine, name, fn)

    def close(self) -> None:
        """Remove the engine listeners."""
        for name, fn in self._listeners.items():
            event.remove(self.engine, name, fn)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        if _CURRENT.get() is not None:
            conn.info.setdefault(self._KEY, []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        stats = _CURRENT.get()
        stack = conn.info.get(self._KEY)
        if stats is not None and stack:
            stats.queries += 1
            stats.db_time_s += time.perf_counter() - stack.pop()

    def _error(self, ctx):
        stats = _CURRENT.get()
        stack = ctx.connection.info.get(self._KEY) if ctx.connection is not None else None
        if stats is not None and stack and ctx.statement is not None:  # a statement sent, and failed
            stats.queries += 1
            stats.failed_statements += 1
            stats.db_time_s += time.perf_counter() - stack.pop()

    def __call__(self, environ, start_response):
        stats = RequestStats(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/"), 0)
        token = _CURRENT.set(stats)
        t0 = time.perf_counter()
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, list(headers)
            return lambda data: None

        try:
            result = self.app(environ, capture)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        except BaseException:
            stats.status = 500
            stats.wall_s = time.perf_counter() - t0
            stats.route = environ.get(ROUTE_KEY, UNMATCHED)
            if self.on_request:
                self.on_request(stats)
            raise
        finally:
            _CURRENT.reset(token)
        stats.wall_s = time.perf_counter() - t0
        stats.status = int(captured["status"].split()[0])
        stats.route = environ.get(ROUTE_KEY, UNMATCHED)
        headers = captured["headers"] + [
            ("X-DB-Queries", str(stats.queries)),
            ("X-DB-Time-ms", f"{stats.db_time_s * 1e3:.2f}"),
        ]
        if self.on_request:
            self.on_request(stats)
        start_response(captured["status"], headers)
        return [body]


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def wsgi_get(app: Callable, path: str, query: str = "") -> Response:
    """A minimal WSGI test client: GET ``path`` and return status, headers and body."""
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    out: dict = {}

    def start_response(status, headers, exc_info=None):
        out["status"], out["headers"] = int(status.split()[0]), dict(headers)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return Response(out["status"], out["headers"], body)


def blog_app(engine: Engine, limit: int = 20) -> Callable:
    """A tiny plain-WSGI app: ``/posts`` (lazy authors: N+1), ``/posts-fixed`` (selectinload), ``/posts/<id>``,
    ``/health``, and ``/broken`` (a statement that fails: a 500). It sets the route template it matched in
    ``environ[ROUTE_KEY]``, as a framework's router would (Flask's ``url_rule``, Django's ``route``)."""

    def respond(start_response, status: str, payload, ctype: str = "application/json"):
        start_response(status, [("Content-Type", ctype)])
        return [payload if isinstance(payload, bytes) else json.dumps(payload).encode()]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/health":
            environ[ROUTE_KEY] = "/health"
            return respond(start_response, "200 OK", b"ok", "text/plain")
        if path == "/broken":
            environ[ROUTE_KEY] = "/broken"
            with engine.connect() as conn:
                conn.execute(text("SELECT 1 / 0"))  # raises: the middleware answers for it with a 500
        if path.startswith("/posts/") and path.removeprefix("/posts/").isdigit():
            environ[ROUTE_KEY] = "/posts/{id}"
            with Session(engine) as session:
                post = session.get(models.Post, int(path.removeprefix("/posts/")))
                if post is None:
                    return respond(start_response, "404 Not Found", {"error": "no such post"})
                return respond(start_response, "200 OK", {"id": post.id, "title": post.title})
        if path not in ("/posts", "/posts-fixed"):
            return respond(start_response, "404 Not Found", b"not found", "text/plain")
        environ[ROUTE_KEY] = path
        stmt = select(models.Post).where(models.Post.published).order_by(models.Post.id.desc()).limit(limit)
        if path == "/posts-fixed":
            stmt = stmt.options(selectinload(models.Post.author))
        with Session(engine) as session:
            posts = session.scalars(stmt).all()
            payload = [{"id": p.id, "title": p.title, "author": p.author.name} for p in posts]
        return respond(start_response, "200 OK", payload)

    return app


# ----------------------------------------------------------------------------- pg_stat_statements
def database_oid(engine: Engine, database: str | None = None) -> int:
    """The oid of ``database`` (default: the engine's own database)."""
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT oid FROM pg_database WHERE datname = coalesce(:db, current_database())"), {"db": database}
        ).scalar_one()


def reset_statements(engine: Engine, database: str | None = None) -> None:
    """Reset pg_stat_statements for ONE database only (never the whole cluster); needs superuser."""
    with engine.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database "
                "WHERE datname = coalesce(:db, current_database())), 0)"
            ),
            {"db": database},
        )
        conn.commit()


def top_statements(
    engine: Engine,
    database: str | None = None,
    *,
    order_by: str = "total_ms",
    limit: int = 10,
    like: str | None = None,
    utility: bool = False,
) -> pd.DataFrame:
    """pg_stat_statements rows of one database: calls, total/mean time, rows, cache hits; top ``limit``.

    ``utility=False`` leaves out transaction control, SET/SHOW, DEALLOCATE and the reads of pg_stat_statements itself.
    """
    if order_by not in ("total_ms", "calls", "mean_ms", "rows"):
        raise ValueError(f"order_by must be total_ms, calls, mean_ms or rows, not {order_by!r}")
    sql = """
        SELECT s.queryid, s.calls, s.total_exec_time AS total_ms, s.mean_exec_time AS mean_ms, s.rows,
               s.shared_blks_hit, s.shared_blks_read, regexp_replace(s.query, '\\s+', ' ', 'g') AS query
        FROM pg_stat_statements s
        JOIN pg_database d ON d.oid = s.dbid
        WHERE d.datname = coalesce(:db, current_database())
          AND (CAST(:like AS text) IS NULL OR s.query ILIKE :like)
          AND (:utility OR (s.query NOT ILIKE '%pg_stat_statements%'
               AND s.query !~* '^\\s*(BEGIN|COMMIT|ROLLBACK|SET|SHOW|LOAD|RESET|SAVEPOINT|RELEASE|DEALLOCATE|DISCARD)\\M'))
        ORDER BY CASE CAST(:order_by AS text)
                   WHEN 'calls' THEN s.calls::float8 WHEN 'rows' THEN s.rows::float8
                   WHEN 'mean_ms' THEN s.mean_exec_time ELSE s.total_exec_time END DESC, s.queryid
        LIMIT :limit
    """
    with engine.connect() as conn:
        return pd.read_sql_query(
            text(sql),
            conn,
            params={"db": database, "like": like, "limit": limit, "utility": utility, "order_by": order_by},
        )


# ----------------------------------------------------------------------------- auto_explain
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_size(path: str | Path) -> int:
    """Current size of the server log (read the log from here on)."""
    return Path(path).stat().st_size


def auto_explain_plans(path: str | Path, since: int, marker: str) -> list[dict]:
    """JSON plans that auto_explain (log_format json) wrote to the server log after byte ``since``,
    for statements containing ``marker``: dicts with ``duration_ms`` and ``plan``."""
    with open(path, "rb") as fh:
        fh.seek(since)
        lines = fh.read().decode(errors="replace").splitlines()
    entries: list[list[str]] = []
    for line in lines:
        if _LOG_LINE.match(line):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    plans = []
    for entry in entries:
        head = entry[0]
        m = re.search(r"duration: ([\d.]+) ms\s+plan:", head)
        if not m:
            continue
        body = "\n".join(entry[1:])
        try:
            plan = json.loads(body)
        except ValueError:
            continue
        if marker in plan.get("Query Text", ""):
            plans.append({"duration_ms": float(m.group(1)), "plan": plan})
    return plans


def plan_nodes(plan: dict) -> list[str]:
    """Node types of a JSON plan, depth first."""
    out = []

    def walk(node):
        out.append(node["Node Type"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return out
