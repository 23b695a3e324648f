"""The notebook-facing toolkit of the Query Optimization Workbook.

Notebooks import only the names below. The first cell of every notebook is::

    from helpers import setup
    engine = setup()
"""

from __future__ import annotations

import importlib

from .config import WorkbookError, settings

# Every public name is imported on first use, so `import helpers` (and `python -m helpers db ...`)
# stays light and a chapter's module can grow without touching this file: name -> module.
_LAZY = {
    "assert_max_queries": "helpers.counting",
    "count_queries": "helpers.counting",
    "clone_database": "helpers.database",
    "database_name": "helpers.database",
    "drop_lab_schema": "helpers.scratch",
    "scratch_name": "helpers.scratch",
    "scratch_suffix": "helpers.scratch",
    "drop_database": "helpers.database",
    "empty_database": "helpers.database",
    "get_engine": "helpers.database",
    "is_embedded": "helpers.database",
    "make_engine": "helpers.database",
    "psycopg_conninfo": "helpers.database",
    "require_extension": "helpers.database",
    "socket_url": "helpers.database",
    "record": "helpers.results",
    "ordering": "helpers.results",
    "lab_schema": "helpers.seed",
    "measure": "helpers.timing",
    "models": "helpers.models",
    "plots": "helpers.plots",
    "seed": "helpers.seed",
    "server": "helpers.server",
    "explain": "helpers.plans",
    "compare": "helpers.plans",
    "Scenario": "helpers.sessions",
    "locks": "helpers.locks",
    "blocking": "helpers.locks",
    "retry": "helpers.retrying",  # module named apart from the function it exports
    "anomalies": "helpers.anomalies",
    "ddl": "helpers.ddl",
    "monitoring": "helpers.monitoring",
    "schema_database": "helpers.testdb",
    "copied_database": "helpers.testdb",
    "bulk": "helpers.bulk",  # chapter 07: bulk-load instruments (sweep, rates, peak memory)
    "rawsql": "helpers.rawsql",  # chapter 07: its scratch tables, sql_of, EXPLAIN and prepared-statement views
    "pooling": "helpers.pooling",
    "pgbouncer": "helpers.pgbouncer",
    "latency": "helpers.latency",
    "exercises": "helpers.exercises",
    "bounded": "helpers.waits",  # every wait has a limit; names the blocker when it expires
    "capabilities": "helpers.capability",  # module named apart from the function it exports
    "have": "helpers.capability",
    "skip_rest_unless": "helpers.capability",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def _try_scalar(conn, sql: str):
    """The value of ``sql``, or None when this role may not run it (inside a savepoint)."""
    from sqlalchemy import text

    try:
        with conn.begin_nested():
            return conn.execute(text(sql)).scalar()
    except Exception:  # noqa: BLE001 - permission or missing extension: the caller reports None
        return None


def where() -> dict:
    """Where the workbook database is: kind, masked URL, server version, scale and seed state."""
    from sqlalchemy import text

    from .database import database_url, get_engine, is_embedded, masked
    from .seed import seeded_info

    engine = get_engine()
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
        extensions = sorted(r[0] for r in conn.execute(text("SELECT extname FROM pg_extension")))
        preload = _try_scalar(conn, "SHOW shared_preload_libraries")  # needs pg_read_all_settings
        pgss = _try_scalar(conn, "SELECT count(*) >= 0 FROM pg_stat_statements") is True
    info = seeded_info(engine) or {}
    return {
        "kind": "embedded" if is_embedded() else "DATABASE_URL",
        "url": masked(database_url()),
        "server_version": version,
        "superuser": bool(superuser),
        "extensions": extensions,
        "shared_preload_libraries": preload,
        "pg_stat_statements": pgss,
        "scale": info.get("scale"),
        "seed": info.get("seed"),
    }


def setup(scale: str | None = None, *, quiet: bool = False):
    """First cell of every notebook: server up, data seeded if needed, one line saying where; returns the engine.

    Run again after the server stopped, it starts the embedded server again and drops the dead
    pooled connections: the same Engine object comes back (unless the server's port changed).
    Inside IPython it also registers the short display of a lost connection (``helpers.kernel``).
    """
    from . import kernel
    from .database import _engines, reconnect, try_create_extension
    from .seed import ensure_seeded

    s = settings()
    scale = scale or s.scale
    ports = {(e.url.username, e.url.database): e.url.port for e in _engines.values()}  # before a restart
    engine = reconnect()
    kernel.install()
    old_port = ports.get((engine.url.username, engine.url.database))
    moved = old_port is not None and old_port != engine.url.port
    seeded_now = ensure_seeded(engine, scale, progress=not quiet)
    try_create_extension(engine, "pg_stat_statements")  # not allowed on a shared server: chapters check
    if not quiet:
        w = where()
        state = "seeded just now" if seeded_now else "already seeded"
        print(
            f"workbook database: {w['kind']} PostgreSQL {w['server_version']} at {w['url']} "
            f"| scale {scale}, seed {s.seed} ({state})"
        )
    if moved:
        print(
            f"The server came back on port {engine.url.port}, not {old_port}: use the engine returned now; "
            "engines made before (make_engine, cells that copied engine.url) still point at the old port: "
            "re-run those cells."
        )
    return engine


__all__ = [
    "WorkbookError",
    "anomalies",
    "bulk",
    "rawsql",
    "ddl",
    "pgbouncer",
    "pooling",
    "assert_max_queries",
    "blocking",
    "clone_database",
    "empty_database",
    "drop_database",
    "compare",
    "count_queries",
    "explain",
    "get_engine",
    "is_embedded",
    "lab_schema",
    "locks",
    "make_engine",
    "measure",
    "models",
    "require_extension",
    "plots",
    "psycopg_conninfo",
    "record",
    "ordering",
    "retry",
    "Scenario",
    "settings",
    "setup",
    "socket_url",
    "where",
    "latency",
    "exercises",
    "monitoring",
    "schema_database",
    "copied_database",
    "database_name",
    "drop_lab_schema",
    "scratch_name",
    "scratch_suffix",
    "bounded",
    "capabilities",
    "have",
    "skip_rest_unless",
]
