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
# Grouped as the package is (CONTRIBUTING: "The map of helpers"): platform, instruments, labs.
_LAZY = {
    # --- the platform: where the database is, engines, scratch databases and schemas, the seed, results
    "REPO_ROOT": "helpers.config",  # the checkout's folder (tests/examples, migrations/)
    "SCALES": "helpers.config",  # scale name -> rows of each kind (config.Scale)
    "get_engine": "helpers.database",
    "is_embedded": "helpers.database",
    "make_engine": "helpers.database",
    "psycopg_conninfo": "helpers.database",
    "require_extension": "helpers.database",
    "socket_url": "helpers.database",
    "CLONE_COMMENT": "helpers.database",  # the stamp on every scratch database the workbook made
    "clone_database": "helpers.scratchdb",
    "database_name": "helpers.scratchdb",
    "drop_database": "helpers.scratchdb",
    "empty_database": "helpers.scratchdb",
    "schema_database": "helpers.scratchdb",
    "copied_database": "helpers.scratchdb",
    "lab_schema": "helpers.scratch",
    "drop_lab_schema": "helpers.scratch",
    "scratch_name": "helpers.scratch",
    "scratch_suffix": "helpers.scratch",
    "models": "helpers.models",
    "er_diagram": "helpers.erd",
    "seed": "helpers.seed",  # the module: seed.seed(), seed.reset(), ...
    "checksum": "helpers.seed",
    "row_counts": "helpers.seed",
    "seeded_info": "helpers.ownership",
    "uniform_sql": "helpers.dataset",  # the seed's deterministic uniform [0, 1), as SQL
    "server": "helpers.server",
    "record": "helpers.results",
    "ordering": "helpers.results",
    "plots": "helpers.plots",
    "capabilities": "helpers.capability",  # module named apart from the function it exports
    "have": "helpers.capability",
    "skip_rest_unless": "helpers.capability",
    "exercises": "helpers.exercises",
    "progress": "helpers.progressbar",  # a bar in JupyterLab, one line in a headless run
    # --- the instruments: what measures a chapter's code
    "assert_max_queries": "helpers.counting",
    "count_queries": "helpers.counting",
    "TooManyQueries": "helpers.counting",
    "measure": "helpers.timing",
    "explain": "helpers.plans",
    "compare": "helpers.plans",
    "Scenario": "helpers.scenario",
    "ISOLATION_LEVELS": "helpers.scenario",  # PostgreSQL's four levels, weakest first: the one definition
    "locks": "helpers.locks",
    "blocking": "helpers.locks",
    "retry": "helpers.retrying",  # module named apart from the function it exports
    "latency": "helpers.latency",
    "bounded": "helpers.waits",  # every wait has a limit; names the blocker when it expires
    # --- the labs: one chapter's machinery each
    "anomalies": "helpers.anomalies",
    "lockwatch": "helpers.lockwatch",  # chapter 06: the DDL lock observatory
    "loadgen": "helpers.loadgen",  # chapter 06: a bounded load of readers, writers and inserters
    "migrate": "helpers.migrate",  # chapter 06: the Alembic project, its SQL, squawk
    "alembic_config": "helpers.migrate",
    "rawsql": "helpers.rawsql",  # chapters 07a and 07b: scratch tables and statement instruments
    "bulk": "helpers.bulk",  # chapter 07b: bulk-load instruments
    "monitoring": "helpers.monitoring",
    "pooling": "helpers.pooling",  # chapter 05 reads its names through the module: pooling.pool_status(...)
    "pgbouncer": "helpers.pgbouncer",
    "poolload": "helpers.poolload",  # chapter 05a's closed-loop load: FairGate, closed_loop, sizing_sweep
    "CommitReplyDropper": "helpers.commit_loss",  # chapter 05b: a proxy that loses the reply to a COMMIT
    # chapters 05 and 09 share one Prometheus exporter
    "Exporter": "helpers.exporter",
    "pool_metrics": "helpers.exporter",
    "metrics_text": "helpers.exporter",
    "parse_metrics": "helpers.exporter",
    "serve_in_workers": "helpers.exporter",  # chapter 09: worker processes, each with its own registry
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
    """Where the workbook database is: kind, masked URL, server version, the server's settings that differ
    from PostgreSQL's defaults (``settings``: what plans and timings depend on), scale and seed state."""
    from sqlalchemy import text

    from .database import database_url, get_engine, is_embedded, masked
    from .ownership import seeded_info

    engine = get_engine()
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
        extensions = sorted(r[0] for r in conn.execute(text("SELECT extname FROM pg_extension")))
        preload = _try_scalar(conn, "SHOW shared_preload_libraries")  # needs pg_read_all_settings
        pgss = _try_scalar(conn, "SELECT count(*) >= 0 FROM pg_stat_statements") is True
        changed = dict(conn.execute(_changed_settings_query()).all())
    info = seeded_info(engine) or {}
    return {
        "kind": "embedded" if is_embedded() else "DATABASE_URL",
        "url": masked(database_url()),
        "server_version": version,
        "superuser": bool(superuser),
        "extensions": extensions,
        "shared_preload_libraries": preload,
        "pg_stat_statements": pgss,
        "settings": changed,
        "scale": info.get("scale"),
        "seed": info.get("seed"),
    }


# The server's settings that differ from PostgreSQL's built-in defaults, as the server shows them
# ("256MB"), leaving out where it listens, its log and locale, which change no lesson.
def _changed_settings_query():
    from sqlalchemy import text

    return text(
        "SELECT name, current_setting(name) FROM pg_settings"
        " WHERE source NOT IN ('default', 'override', 'client', 'session')"
        " AND setting IS DISTINCT FROM boot_val"
        " AND name NOT IN ('port', 'listen_addresses', 'unix_socket_directories', 'logging_collector',"
        " 'dynamic_shared_memory_type', 'default_text_search_config', 'DateStyle', 'application_name')"
        " AND name NOT LIKE 'log%' AND name NOT LIKE 'lc%' ORDER BY name"
    )


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


# the public face: what notebooks import (tests/test_repo.py checks that they import nothing else)
__all__ = ["WorkbookError", "settings", "setup", "where", *_LAZY]


def __dir__() -> list[str]:
    """``dir(helpers)`` and Tab completion show the public names, the lazy ones included."""
    return sorted(__all__)
