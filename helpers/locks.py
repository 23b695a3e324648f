"""Who holds which lock and who waits for whom: readable views of pg_locks and pg_blocking_pids.

``locks()`` lists the locks of some backends (or on one relation), ``blocking()`` lists backends
with the pids blocking them, ``strongest()`` picks the strongest table-lock mode from a list.
The lock conflict measurements of chapter 03b live here too, below the views.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, text

# The eight table-level lock modes as pg_locks names them, weakest first
# (https://www.postgresql.org/docs/current/explicit-locking.html#LOCKING-TABLES).
MODES = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]

# The four row-level lock strengths, weakest first, as written after SELECT ... .
ROW_LOCK_MODES = ["FOR KEY SHARE", "FOR SHARE", "FOR NO KEY UPDATE", "FOR UPDATE"]

_LOCKS_SQL = """
SELECT l.pid, a.application_name, l.locktype,
       CASE WHEN l.relation IS NOT NULL THEN l.relation::regclass::text END AS relation,
       l.mode, l.granted, l.waitstart,
       l.transactionid::text AS transactionid, l.virtualxid, l.page, l.tuple
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.pid IS NOT NULL AND l.pid <> pg_backend_pid()
  AND (l.database IS NULL OR l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
  AND (CAST(:all_pids AS boolean) OR l.pid = ANY(CAST(:pids AS int[])))
  AND (CAST(:rel AS text) IS NULL OR l.relation = to_regclass(CAST(:rel AS text)))
ORDER BY l.pid, l.granted DESC, l.locktype, relation NULLS LAST, l.mode
"""

_BLOCKING_SQL = """
SELECT a.pid, a.application_name, a.state, a.wait_event_type, a.wait_event,
       pg_blocking_pids(a.pid) AS blocked_by, a.query
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
  AND (CAST(:like AS text) IS NULL OR a.application_name LIKE CAST(:like AS text))
ORDER BY a.pid
"""


def locks(engine: Engine, pids=None, relation: str | None = None) -> pd.DataFrame:
    """Locks held or awaited by ``pids`` (all backends but this one when None), optionally on one ``relation``."""
    pid_list = [int(p) for p in pids] if pids is not None else []
    with engine.connect() as conn:
        df = pd.DataFrame(
            conn.execute(text(_LOCKS_SQL), {"all_pids": pids is None, "pids": pid_list, "rel": relation})
            .mappings()
            .all(),
            columns=[
                "pid",
                "application_name",
                "locktype",
                "relation",
                "mode",
                "granted",
                "waitstart",
                "transactionid",
                "virtualxid",
                "page",
                "tuple",
            ],
        )
    return df


def blocking(engine: Engine, application_name_like: str | None = None) -> pd.DataFrame:
    """Backends of this database with the pids blocking them (pg_blocking_pids).

    With ``application_name_like`` (a LIKE pattern, e.g. ``'wb_scenario_%'``) every matching backend
    is listed; without it only backends that are blocked or block someone.
    """
    with engine.connect() as conn:
        rows = conn.execute(text(_BLOCKING_SQL), {"like": application_name_like}).mappings().all()
    df = pd.DataFrame(
        rows, columns=["pid", "application_name", "state", "wait_event_type", "wait_event", "blocked_by", "query"]
    )
    df["blocked_by"] = df["blocked_by"].map(lambda v: sorted(v or []))
    if application_name_like is None and not df.empty:
        blockers = {p for b in df["blocked_by"] for p in b}
        df = df[df["blocked_by"].map(bool) | df["pid"].isin(blockers)].reset_index(drop=True)
    return df


def strongest(modes) -> str | None:
    """The strongest table-lock mode among ``modes`` (pg_locks names), None when there is none."""
    known = [m for m in modes if m in MODES]
    return max(known, key=MODES.index) if known else None


def lock_sql(mode: str) -> str:
    """``AccessShareLock`` -> ``ACCESS SHARE`` (the words LOCK TABLE ... IN <mode> MODE takes)."""
    if mode not in MODES:
        raise ValueError(f"unknown table lock mode {mode!r}; expected one of {MODES}")
    words, word = [], ""
    for ch in mode.removesuffix("Lock"):
        if ch.isupper() and word:
            words.append(word)
            word = ""
        word += ch
    words.append(word)
    return " ".join(words).upper()


# -- measured lock conflicts (chapter 03b) ------------------------------------------------------------


def _conflicts(database: str | None, setup: list[str], hold, request, modes: list[str]) -> pd.DataFrame:
    """Matrix requested x held: True when ``request(mode)`` fails with 55P03 while ``hold(mode)`` is held."""
    import psycopg

    from .database import psycopg_conninfo

    info = psycopg_conninfo(database)
    out = pd.DataFrame(False, index=pd.Index(modes, name="requested"), columns=pd.Index(modes, name="held"))
    with (
        psycopg.connect(**info, autocommit=True, application_name="wb_locks_holder") as holder,
        psycopg.connect(**info, autocommit=True, application_name="wb_locks_requester") as requester,
    ):
        for stmt in setup:
            holder.execute(stmt)
        for held in modes:
            holder.execute("BEGIN")
            holder.execute("SELECT set_config('lock_timeout', %s, true)", ("2s",))
            holder.execute(hold(held))
            for req in modes:
                requester.execute("BEGIN")
                try:
                    requester.execute(request(req))
                except psycopg.errors.LockNotAvailable:
                    out.loc[req, held] = True
                finally:
                    requester.execute("ROLLBACK")
            holder.execute("ROLLBACK")
    return out


def _probe_table(schema: str):
    from psycopg import sql

    return sql.Identifier(schema, "conflict_probe")


def table_conflicts(schema: str, database: str | None = None) -> pd.DataFrame:
    """Measured 8x8 table-lock conflicts: one session holds ``LOCK TABLE ... IN <held> MODE``, another asks NOWAIT."""
    from psycopg import sql

    t = _probe_table(schema)
    # the mode's words come from MODES only (lock_sql refuses anything else): keywords, not values
    return _conflicts(
        database,
        [sql.SQL("DROP TABLE IF EXISTS {}").format(t), sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(t)],
        lambda m: sql.SQL("LOCK TABLE {} IN {} MODE").format(t, sql.SQL(lock_sql(m))),
        lambda m: sql.SQL("LOCK TABLE {} IN {} MODE NOWAIT").format(t, sql.SQL(lock_sql(m))),
        MODES,
    )


def _row_mode(mode: str):
    from psycopg import sql

    if mode not in ROW_LOCK_MODES:
        raise ValueError(f"unknown row lock mode {mode!r}; expected one of {ROW_LOCK_MODES}")
    return sql.SQL(mode)


def row_conflicts(schema: str, database: str | None = None) -> pd.DataFrame:
    """Measured 4x4 row-lock conflicts: ``SELECT ... <held>`` on a row, then ``SELECT ... <requested> NOWAIT``."""
    from psycopg import sql

    t = _probe_table(schema)
    return _conflicts(
        database,
        [
            sql.SQL("DROP TABLE IF EXISTS {}").format(t),
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(t),
            sql.SQL("INSERT INTO {} VALUES (1)").format(t),
        ],
        lambda m: sql.SQL("SELECT id FROM {} WHERE id = 1 {}").format(t, _row_mode(m)),
        lambda m: sql.SQL("SELECT id FROM {} WHERE id = 1 {} NOWAIT").format(t, _row_mode(m)),
        ROW_LOCK_MODES,
    )


def locks_taken(
    statements: dict[str, str], setup: list[str] = (), database: str | None = None, schema: str | None = None
) -> pd.DataFrame:
    """The relation locks each statement takes (run in its own rolled-back transaction): statement, relation, mode.

    With ``schema``, only locks on that schema's relations are kept, and the session's ``search_path`` is that
    schema, so the statements name their tables without it.
    """
    import psycopg
    from psycopg import sql

    from .database import psycopg_conninfo

    rows = []
    with psycopg.connect(**psycopg_conninfo(database), autocommit=True, application_name="wb_locks_taken") as conn:
        if schema:
            conn.execute("SELECT set_config('search_path', %s, false)", (sql.Identifier(schema).as_string(conn),))
        for stmt in setup:
            conn.execute(stmt)
        for label, sql in statements.items():
            conn.execute("BEGIN")
            conn.execute("SELECT set_config('lock_timeout', %s, true)", ("2s",))
            conn.execute(sql)
            got = conn.execute(
                "SELECT c.relname, c.relkind::text, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND (%s::text IS NULL OR n.nspname = %s) "
                "ORDER BY c.relname, l.mode",
                (schema, schema),
            ).fetchall()
            conn.execute("ROLLBACK")
            rows += [
                {"statement": label, "relation": r, "kind": {"r": "table", "i": "index"}.get(k, k), "mode": m}
                for r, k, m in got
            ]
    return pd.DataFrame(rows, columns=["statement", "relation", "kind", "mode"])
