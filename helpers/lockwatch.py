"""The DDL lock observatory of chapter 06: which lock a statement takes, whom it blocks, what it rewrites.

``observe_ddl`` runs one DDL statement in a transaction held open on purpose and asks the server
what it holds (pg_locks, through ``helpers.locks``), whether a concurrent reader and writer are
blocked (``lock_timeout`` expires with SQLSTATE 55P03: the server decides, not a sleep), whether
the table was rewritten (relfilenode changed) and scanned (pg_stat_xact_user_tables).
``CREATE INDEX CONCURRENTLY`` cannot run in a transaction: it is observed while it waits behind an
open writer. ``observe_steps`` does the same for a migration given as a list of statements (the
chapter's exercises judge with it). ``BlockedTimeline`` samples who waits for a lock over time.

Identifiers reach SQL only through ``psycopg.sql.Identifier``: a case's ``{c}`` (the child table)
and ``{p}`` (the parent table) are ``psycopg.sql.SQL.format`` placeholders.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import psycopg
from psycopg import sql
from sqlalchemy import Engine, text

from .database import psycopg_conninfo
from .locks import MODES, locks, strongest

APP = "wb_migrations"  # application_name prefix of every connection the chapter's instruments open
PARENT_ROWS = 200
CHILD_ROWS = 2_000
#: table lock modes that make writers (INSERT/UPDATE/DELETE, RowExclusiveLock) wait
BLOCKS_WRITES = set(MODES[MODES.index("ShareLock") :])


def app_conninfo(engine: Engine, app: str = APP) -> dict:
    """psycopg.connect keyword arguments for the database of ``engine``, tagged with an application_name."""
    kw = psycopg_conninfo(engine.url.database)
    kw["application_name"] = app
    return kw


def server_version_num(engine: Engine) -> int:
    """``server_version_num`` of the server behind ``engine`` (e.g. 180001)."""
    with psycopg.connect(**app_conninfo(engine)) as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0])


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.01) -> bool:
    """Ask ``predicate`` (a question to the server) until it is true; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def _blocked_by(engine: Engine, pid: int) -> list[int]:
    """pg_blocking_pids(pid): the backends ``pid`` is waiting for (empty when it is not waiting)."""
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT pg_blocking_pids(:pid)"), {"pid": pid}).scalar() or [])


# ----------------------------------------------------------------------------- the demo tables
def demo_tables(engine: Engine, schema: str) -> tuple[str, str]:
    """(Re)create ``schema.parent`` and ``schema.child`` (CHILD_ROWS rows, no constraints between them).

    Returns their qualified names as text (for pg_locks and to_regclass, never pasted into SQL).
    """
    s, p, c = sql.Identifier(schema), sql.Identifier(schema, "parent"), sql.Identifier(schema, "child")
    with psycopg.connect(**app_conninfo(engine), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(c, p))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, label text NOT NULL)").format(p))
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'p' || g FROM generate_series(1, %s) g").format(p), (PARENT_ROWS,)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, parent_id int NOT NULL, v int NOT NULL, n int NOT NULL, "
                "name varchar(50) NOT NULL, filled int, extra text)"
            ).format(c)
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, 1 + g %% %s, g %% 100, g, 'name ' || g, g, 'x' FROM generate_series(1, %s) g"
            ).format(c),
            (PARENT_ROWS, CHILD_ROWS),
        )
        conn.execute(
            sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$").format(
                sql.Identifier(schema, "child_touch")
            )
            if not conn.execute("SELECT to_regproc(%s)", (f"{schema}.child_touch",)).fetchone()[0]
            else sql.SQL("SELECT 1")
        )
        conn.execute(
            sql.SQL("CREATE TRIGGER child_touch BEFORE UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
                c, sql.Identifier(schema, "child_touch")
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER child_touch").format(c))
        conn.execute(sql.SQL("ANALYZE {}, {}").format(p, c))
    return f"{schema}.parent", f"{schema}.child"


def drop_demo_tables(engine: Engine, schema: str) -> None:
    """Drop what ``demo_tables`` made in ``schema`` (the two tables and the trigger function)."""
    with psycopg.connect(**app_conninfo(engine), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                sql.Identifier(schema, "child"), sql.Identifier(schema, "parent")
            )
        )
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(schema, "child_touch")))


@dataclass(frozen=True)
class DDLCase:
    sql: str  # psycopg.sql template: {c} = the child table, {p} = the parent (referenced) table
    prepare: tuple[str, ...] = ()  # run and committed before the observed statement
    references: bool = False  # a foreign key: also report the lock on the referenced table
    concurrent: bool = False  # CREATE INDEX CONCURRENTLY: observed while it waits, not in a transaction


_FK = "ALTER TABLE {c} ADD CONSTRAINT child_parent_fk FOREIGN KEY (parent_id) REFERENCES {p} (id)"
_CHECK = "ALTER TABLE {c} ADD CONSTRAINT child_v_nonneg CHECK (v >= 0) NOT VALID"

#: the DDL statements of the measured table, in the order the chapter shows them
DDL_CASES: dict[str, DDLCase] = {
    "add_nullable_column": DDLCase("ALTER TABLE {c} ADD COLUMN note text"),
    "add_column_const_default": DDLCase("ALTER TABLE {c} ADD COLUMN flag boolean NOT NULL DEFAULT false"),
    "add_column_volatile_default": DDLCase("ALTER TABLE {c} ADD COLUMN r double precision DEFAULT random()"),
    "drop_column": DDLCase("ALTER TABLE {c} DROP COLUMN extra"),
    "set_not_null": DDLCase("ALTER TABLE {c} ALTER COLUMN filled SET NOT NULL"),
    "add_check_not_valid": DDLCase(_CHECK),
    "validate_check": DDLCase("ALTER TABLE {c} VALIDATE CONSTRAINT child_v_nonneg", prepare=(_CHECK,)),
    "add_foreign_key": DDLCase(_FK, references=True),
    "add_foreign_key_not_valid": DDLCase(_FK + " NOT VALID", references=True),
    "validate_foreign_key": DDLCase(
        "ALTER TABLE {c} VALIDATE CONSTRAINT child_parent_fk", prepare=(_FK + " NOT VALID",), references=True
    ),
    "create_index": DDLCase("CREATE INDEX child_n_idx ON {c} (n)"),
    "create_index_concurrently": DDLCase("CREATE INDEX CONCURRENTLY child_n_idx ON {c} (n)", concurrent=True),
    "alter_type_int_to_bigint": DDLCase("ALTER TABLE {c} ALTER COLUMN n TYPE bigint"),
    "alter_type_varchar_to_text": DDLCase("ALTER TABLE {c} ALTER COLUMN name TYPE text"),
    "rename_column": DDLCase("ALTER TABLE {c} RENAME COLUMN name TO label"),
    "set_statistics": DDLCase("ALTER TABLE {c} ALTER COLUMN n SET STATISTICS 500"),
    "set_storage_parameter": DDLCase("ALTER TABLE {c} SET (autovacuum_vacuum_scale_factor = 0.01)"),
    "enable_trigger": DDLCase("ALTER TABLE {c} ENABLE TRIGGER child_touch"),
}

READ_SQL = "SELECT v FROM {c} WHERE id = 1"
WRITE_SQL = "UPDATE {c} SET v = v + 1 WHERE id = 2"
WRITE_REFERENCED_SQL = "UPDATE {p} SET label = label WHERE id = 1"


def probe(
    engine: Engine,
    statement,
    lock_timeout: str = "200ms",
    app: str = APP + "_probe",
    conn: psycopg.Connection | None = None,
) -> dict:
    """Run ``statement`` once in its own transaction with ``lock_timeout``; blocked = the server said 55P03.

    ``conn`` (a non-autocommit connection) is reused when given; the transaction is rolled back.
    """
    t0 = time.perf_counter()
    own = conn is None
    conn = conn or psycopg.connect(**app_conninfo(engine, app))
    try:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        conn.execute("SELECT set_config('statement_timeout', '10s', true)")
        try:
            conn.execute(statement)
            sqlstate = None
        except psycopg.Error as exc:
            sqlstate = exc.sqlstate
        conn.rollback()
    finally:
        if own:
            conn.close()
    if sqlstate not in (None, "55P03"):
        raise RuntimeError(f"probe {statement!r} failed with SQLSTATE {sqlstate}")
    return {"blocked": sqlstate == "55P03", "sqlstate": sqlstate, "wait_s": time.perf_counter() - t0}


def _table_state(conn, table: str) -> tuple[int, int]:
    """(relfilenode, sequential scans of ``table`` in this transaction) as this connection sees them."""
    return conn.execute(
        "SELECT c.relfilenode, COALESCE(s.seq_scan, 0) FROM pg_class c "
        "LEFT JOIN pg_stat_xact_user_tables s ON s.relid = c.oid WHERE c.oid = to_regclass(%s)",
        (table,),
    ).fetchone()


def _table_locks(engine: Engine, pid: int, tables: list[str]) -> dict[str, str | None]:
    df = locks(engine, pids=[pid])
    df = df[(df["locktype"] == "relation") & df["granted"]]
    return {t: strongest(df.loc[df["relation"] == t, "mode"]) for t in tables}


def _compose(template: str, schema: str) -> sql.Composed:
    return sql.SQL(template).format(c=sql.Identifier(schema, "child"), p=sql.Identifier(schema, "parent"))


def observe_ddl(
    engine: Engine,
    name: str,
    schema: str = "wb_migrations",
    lock_timeout: str = "200ms",
    case: DDLCase | None = None,
    probes: dict | None = None,
) -> dict:
    """Measure one of DDL_CASES (or ``case``) on fresh demo tables: locks held, reader/writer blocked, rewrite, scan.

    ``probes`` may hold open connections to reuse: "read", "write", "write_ref" (see ``ddl_table``).
    """
    case = case or DDL_CASES[name]
    probes = probes or {}
    parent, child = demo_tables(engine, schema)
    statement = _compose(case.sql, schema)
    shown = sql.SQL(case.sql).format(c=sql.Identifier("child"), p=sql.Identifier("parent"))
    if case.prepare:
        with psycopg.connect(**app_conninfo(engine), autocommit=True) as conn:
            for stmt in case.prepare:
                conn.execute(_compose(stmt, schema))
    if case.concurrent:
        return _observe_concurrent(engine, name, statement, shown, schema, lock_timeout)
    with psycopg.connect(**app_conninfo(engine, APP + "_ddl")) as ddl:
        pid = ddl.info.backend_pid
        ddl.execute("SELECT set_config('lock_timeout', '5s', true)")
        node_before, _ = _table_state(ddl, child)
        t0 = time.perf_counter()
        ddl.execute(statement)
        ddl_s = time.perf_counter() - t0
        node_after, scans = _table_state(ddl, child)
        # the transaction stays open: whatever it holds now, it holds until COMMIT
        held = _table_locks(engine, pid, [child, parent])
        reader = probe(engine, _compose(READ_SQL, schema), lock_timeout, conn=probes.get("read"))
        writer = probe(engine, _compose(WRITE_SQL, schema), lock_timeout, conn=probes.get("write"))
        ref_writer = (
            probe(engine, _compose(WRITE_REFERENCED_SQL, schema), lock_timeout, conn=probes.get("write_ref"))
            if case.references
            else None
        )
        shown_text = shown.as_string(ddl)
        ddl.rollback()
    return {
        "ddl": name,
        "sql": shown_text,
        "lock": held[child],
        "blocks_reads": reader["blocked"],
        "blocks_writes": writer["blocked"],
        "rewrites_table": node_after != node_before,
        "scans_table": scans > 0,
        "referenced_table_lock": held[parent] if case.references else None,
        "blocks_referenced_writes": ref_writer["blocked"] if ref_writer else None,
        "ddl_ms": ddl_s * 1000,
    }


def _observe_concurrent(engine: Engine, name: str, statement, shown, schema: str, lock_timeout: str) -> dict:
    """CREATE INDEX CONCURRENTLY, observed while it waits for an open writer transaction to end."""
    child = f"{schema}.child"
    with psycopg.connect(**app_conninfo(engine, APP + "_writer")) as writer:
        writer.execute(_compose(WRITE_SQL, schema).as_string(writer).replace("id = 2", "id = 3"))
        with psycopg.connect(**app_conninfo(engine, APP + "_ddl"), autocommit=True) as ddl:
            pid = ddl.info.backend_pid
            node_before = ddl.execute(
                "SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)", (child,)
            ).fetchone()[0]
            ddl.execute("SET statement_timeout = '20s'")
            outcome: dict = {}

            def build():
                t0 = time.perf_counter()
                try:
                    ddl.execute(statement)
                    outcome["sqlstate"] = None
                except psycopg.Error as exc:
                    outcome["sqlstate"] = exc.sqlstate
                outcome["ddl_s"] = time.perf_counter() - t0

            thread = threading.Thread(target=build, daemon=True)
            thread.start()
            try:
                if not wait_until(lambda: writer.info.backend_pid in _blocked_by(engine, pid), timeout_s=10):
                    raise RuntimeError("CREATE INDEX CONCURRENTLY never waited for the open writer")
                held = _table_locks(engine, pid, [child])
                reader = probe(engine, _compose(READ_SQL, schema), lock_timeout)
                other_writer = probe(engine, _compose(WRITE_SQL, schema), lock_timeout)
            finally:
                writer.commit()  # the build goes on once the writer's transaction is over
                thread.join(30)
            if outcome.get("sqlstate"):
                raise RuntimeError(f"{name} failed with SQLSTATE {outcome['sqlstate']}")
            node_after, valid = ddl.execute(
                "SELECT (SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)), "
                "(SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s))",
                (child, f"{schema}.child_n_idx"),
            ).fetchone()
            shown_text = shown.as_string(ddl)
    return {
        "ddl": name,
        "sql": shown_text,
        "lock": held[child],
        "blocks_reads": reader["blocked"],
        "blocks_writes": other_writer["blocked"],
        "rewrites_table": node_after != node_before,
        "scans_table": None,  # not in one transaction: pg_stat_xact_* cannot see it
        "referenced_table_lock": None,
        "blocks_referenced_writes": None,
        "ddl_ms": outcome["ddl_s"] * 1000,
        "index_valid": bool(valid),
    }


def ddl_table(
    engine: Engine, names=None, schema: str = "wb_migrations", lock_timeout: str = "200ms", progress: bool = False
) -> pd.DataFrame:
    """observe_ddl for every case (or ``names``): one row per DDL statement (``progress``: a progress bar)."""
    from .progressbar import progress as bar

    probes = {k: psycopg.connect(**app_conninfo(engine, APP + "_probe")) for k in ("read", "write", "write_ref")}
    try:
        todo = list(names or DDL_CASES)
        steps = bar(todo, desc="DDL statements measured", unit="statement", disable=not progress)
        rows = [observe_ddl(engine, n, schema, lock_timeout, probes=probes) for n in steps]
    finally:
        for conn in probes.values():
            conn.close()
    drop_demo_tables(engine, schema)
    return pd.DataFrame(rows).set_index("ddl")


# ----------------------------------------------------------------------------- a migration, step by step
def _observe_concurrent_step(engine: Engine, schema: str, table: str, step: str) -> dict:
    """A CONCURRENTLY step on autocommit, observed while it waits for an open writer transaction on ``table``."""
    qualified = f"{schema}.{table}"
    with psycopg.connect(**app_conninfo(engine, APP + "_writer")) as writer:
        writer.execute(
            sql.SQL("UPDATE {t} SET id = id WHERE id = (SELECT min(id) FROM {t})").format(
                t=sql.Identifier(schema, table)
            )
        )
        with psycopg.connect(**app_conninfo(engine, APP + "_step"), autocommit=True) as conn:
            conn.execute("SELECT set_config('search_path', %s, false)", (schema,))
            conn.execute("SELECT set_config('statement_timeout', '20s', false)")
            pid = conn.info.backend_pid
            node_before = conn.execute("SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)", (qualified,))
            node_before = node_before.fetchone()[0]
            outcome: dict = {}

            def run():
                try:
                    conn.execute(step)
                    outcome["sqlstate"] = None
                except psycopg.Error as exc:
                    outcome["sqlstate"], outcome["error"] = exc.sqlstate, str(exc).splitlines()[0]

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            held = None
            try:
                if wait_until(lambda: writer.info.backend_pid in _blocked_by(engine, pid) or not thread.is_alive(), 10):
                    held = _table_locks(engine, pid, [qualified])[qualified] if thread.is_alive() else None
            finally:
                writer.rollback()
                thread.join(30)
            node_after = conn.execute("SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)", (qualified,))
            node_after = node_after.fetchone()[0]
    return {
        "lock": held,
        "scanned": None,  # not one transaction: pg_stat_xact_* cannot see it
        "rewrote": node_after != node_before,
        "in_transaction": False,
        **outcome,
    }


def observe_steps(engine: Engine, schema: str, table: str, steps) -> pd.DataFrame:
    """Run a migration given as SQL statements, each its own transaction, on tables of ``schema``.

    ``schema`` is the search_path, so a step names ``table`` unqualified. A step with CONCURRENTLY
    runs on autocommit and is observed while it waits for an open writer; every other step runs in
    a transaction that is measured before it commits. One row per step: the strongest lock it held
    on ``table``, whether it scanned ``table`` (pg_stat_xact_user_tables.seq_scan, index builds
    included), whether it rewrote it (relfilenode changed), and the SQLSTATE when it failed (the
    steps after a failed one are not run).
    """
    qualified = f"{schema}.{table}"
    rows = []
    for step in steps:
        if "concurrently" in str(step).lower():
            row = _observe_concurrent_step(engine, schema, table, step)
        else:
            with psycopg.connect(**app_conninfo(engine, APP + "_step")) as conn:
                conn.execute("SELECT set_config('search_path', %s, true)", (schema,))
                conn.execute("SELECT set_config('lock_timeout', '5s', true)")
                conn.execute("SELECT set_config('statement_timeout', '20s', true)")
                node_before, scans_before = _table_state(conn, qualified)
                row = {"sqlstate": None, "in_transaction": True}
                try:
                    conn.execute(step)
                except psycopg.Error as exc:
                    row.update(sqlstate=exc.sqlstate, error=str(exc).splitlines()[0])
                    conn.rollback()
                    row.update(lock=None, scanned=False, rewrote=False)
                else:
                    node_after, scans_after = _table_state(conn, qualified)
                    held = _table_locks(engine, conn.info.backend_pid, [qualified])[qualified]
                    row.update(lock=held, scanned=scans_after > scans_before, rewrote=node_after != node_before)
                    conn.commit()
        rows.append({"step": str(step), **row})
        if row.get("sqlstate"):
            break
    df = pd.DataFrame(rows, columns=["step", "lock", "scanned", "rewrote", "in_transaction", "sqlstate", "error"])
    df["blocks_writes"] = df["lock"].isin(BLOCKS_WRITES)
    return df


# ----------------------------------------------------------------------------- waiting sessions
_WAITING_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name LIKE %s AND cardinality(pg_blocking_pids(pid)) > 0"
)


def waiting(engine: Engine, app_like: str) -> int:
    """How many backends whose application_name is LIKE ``app_like`` are waiting for a lock now."""
    with psycopg.connect(**app_conninfo(engine, APP + "_observer"), autocommit=True) as conn:
        return int(conn.execute(_WAITING_SQL, (app_like,)).fetchone()[0])


class BlockedTimeline:
    """Samples, in a thread, how many backends named LIKE ``app_like`` wait for a lock (pg_blocking_pids).

    ``with BlockedTimeline(engine, "wb_migrations_%", t0=load.t0) as tl: ...`` then ``tl.df``
    (columns t_s, blocked). Sampling only observes; it decides nothing. Stops by itself after ``max_s``.
    """

    def __init__(
        self, engine: Engine, app_like: str, t0: float | None = None, poll_s: float = 0.02, max_s: float = 30.0
    ):
        self.engine, self.app_like, self.poll_s, self.max_s = engine, app_like, poll_s, max_s
        self.t0 = t0
        self._stop = threading.Event()
        self._samples: list[tuple[float, int]] = []

    def _run(self) -> None:
        with psycopg.connect(**app_conninfo(self.engine, APP + "_observer"), autocommit=True) as conn:
            while not self._stop.is_set() and time.perf_counter() - self.t0 < self.max_s:
                n = conn.execute(_WAITING_SQL, (self.app_like,)).fetchone()[0]
                self._samples.append((time.perf_counter() - self.t0, int(n)))
                self._stop.wait(self.poll_s)

    def __enter__(self) -> BlockedTimeline:
        self.t0 = self.t0 if self.t0 is not None else time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.df = pd.DataFrame(self._samples, columns=["t_s", "blocked"])


def invalid_indexes(engine: Engine) -> list[tuple[str, str]]:
    """(schema, index) of indexes left INVALID (pg_index.indisvalid = false), e.g. by a failed CONCURRENTLY build."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid ORDER BY 1, 2"
            )
        )
        return [(r[0], r[1]) for r in rows]
