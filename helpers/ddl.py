"""The DDL lock observatory and a bounded load generator (chapter 06, zero-downtime migrations).

``observe_ddl`` runs one DDL statement in a transaction held open on purpose and asks the server
what it holds (pg_locks, through ``helpers.locks``), whether a concurrent reader and writer are
blocked (``lock_timeout`` expires with SQLSTATE 55P03: the server decides, not a sleep), whether
the table was rewritten (relfilenode changed) and scanned (pg_stat_xact_user_tables).
``CREATE INDEX CONCURRENTLY`` cannot run in a transaction: it is observed while it waits behind an
open writer. ``Load`` keeps reading and writing while a migration runs and reports every
operation's wait, so the longest wait and the throughput over time can be read off.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import psycopg
from sqlalchemy import Engine, text

from .database import psycopg_conninfo
from .locks import locks, strongest

APP = "wb_migrations"  # application_name prefix of every connection this module opens
PARENT_ROWS = 200
CHILD_ROWS = 2_000


def conninfo(engine: Engine, app: str = APP) -> dict:
    """psycopg.connect keyword arguments for the database of ``engine``, tagged with an application_name."""
    kw = psycopg_conninfo(engine.url.database)
    kw["application_name"] = app
    return kw


def server_version_num(engine: Engine) -> int:
    """``server_version_num`` of the server behind ``engine`` (e.g. 180001)."""
    with psycopg.connect(**conninfo(engine)) as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0])


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.01) -> bool:
    """Ask ``predicate`` (a question to the server) until it is true; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def blocked_by(engine: Engine, pid: int) -> list[int]:
    """pg_blocking_pids(pid): the backends ``pid`` is waiting for (empty when it is not waiting)."""
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT pg_blocking_pids(:pid)"), {"pid": pid}).scalar() or [])


# ----------------------------------------------------------------------------- the demo tables
def demo_tables(engine: Engine, schema: str) -> tuple[str, str]:
    """(Re)create ``schema.parent`` and ``schema.child`` (CHILD_ROWS rows, no constraints between them)."""
    parent, child = f"{schema}.parent", f"{schema}.child"
    with psycopg.connect(**conninfo(engine), autocommit=True) as conn:
        conn.execute(  # one round trip: no parameters, several statements
            f"CREATE SCHEMA IF NOT EXISTS {schema}; DROP TABLE IF EXISTS {child}, {parent}; "
            f"CREATE TABLE {parent} (id int PRIMARY KEY, label text NOT NULL); "
            f"INSERT INTO {parent} SELECT g, 'p' || g FROM generate_series(1, {PARENT_ROWS}) g; "
            f"CREATE TABLE {child} (id int PRIMARY KEY, parent_id int NOT NULL, v int NOT NULL, n int NOT NULL, "
            "name varchar(50) NOT NULL, filled int, extra text); "
            f"INSERT INTO {child} SELECT g, 1 + g % {PARENT_ROWS}, g % 100, g, 'name ' || g, g, 'x' "
            f"FROM generate_series(1, {CHILD_ROWS}) g; "
            f"ANALYZE {parent}, {child}"
        )
    return parent, child


@dataclass(frozen=True)
class DDLCase:
    sql: str  # {c} = the child table, {p} = the parent (referenced) table
    prepare: tuple[str, ...] = ()  # run and committed before the observed statement
    references: bool = False  # a foreign key: also report the lock on the referenced table
    concurrent: bool = False  # CREATE INDEX CONCURRENTLY: observed while it waits, not in a transaction


_FK = "ALTER TABLE {c} ADD CONSTRAINT child_parent_fk FOREIGN KEY (parent_id) REFERENCES {p} (id)"
_CHECK = "ALTER TABLE {c} ADD CONSTRAINT child_v_nonneg CHECK (v >= 0) NOT VALID"

#: the fifteen DDL statements of the measured table, in the order the chapter shows them
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
}

READ_SQL = "SELECT v FROM {c} WHERE id = 1"
WRITE_SQL = "UPDATE {c} SET v = v + 1 WHERE id = 2"
WRITE_REFERENCED_SQL = "UPDATE {p} SET label = label WHERE id = 1"


def probe(
    engine: Engine,
    sql: str,
    lock_timeout: str = "200ms",
    app: str = APP + "_probe",
    conn: psycopg.Connection | None = None,
) -> dict:
    """Run ``sql`` once in its own transaction with ``lock_timeout``; blocked = the server said 55P03.

    ``conn`` (a non-autocommit connection) is reused when given; the transaction is rolled back.
    """
    t0 = time.perf_counter()
    own = conn is None
    conn = conn or psycopg.connect(**conninfo(engine, app))
    try:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        conn.execute("SELECT set_config('statement_timeout', '10s', true)")
        try:
            conn.execute(sql)
            sqlstate = None
        except psycopg.Error as exc:
            sqlstate = exc.sqlstate
        conn.rollback()
    finally:
        if own:
            conn.close()
    if sqlstate not in (None, "55P03"):
        raise RuntimeError(f"probe {sql!r} failed with SQLSTATE {sqlstate}")
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
    sql = case.sql.format(c=child, p=parent)
    if case.prepare:
        with psycopg.connect(**conninfo(engine), autocommit=True) as conn:
            for stmt in case.prepare:
                conn.execute(stmt.format(c=child, p=parent))
    if case.concurrent:
        return _observe_concurrent(engine, name, sql, child, lock_timeout)
    with psycopg.connect(**conninfo(engine, APP + "_ddl")) as ddl:
        pid = ddl.info.backend_pid
        ddl.execute("SELECT set_config('lock_timeout', '5s', true)")
        node_before, _ = _table_state(ddl, child)
        t0 = time.perf_counter()
        ddl.execute(sql)
        ddl_s = time.perf_counter() - t0
        node_after, scans = _table_state(ddl, child)
        # the transaction stays open: whatever it holds now, it holds until COMMIT
        held = _table_locks(engine, pid, [child, parent])
        reader = probe(engine, READ_SQL.format(c=child), lock_timeout, conn=probes.get("read"))
        writer = probe(engine, WRITE_SQL.format(c=child), lock_timeout, conn=probes.get("write"))
        ref_writer = (
            probe(engine, WRITE_REFERENCED_SQL.format(p=parent), lock_timeout, conn=probes.get("write_ref"))
            if case.references
            else None
        )
        ddl.rollback()
    return {
        "ddl": name,
        "sql": sql.replace(f"{schema}.", ""),
        "lock": held[child],
        "blocks_reads": reader["blocked"],
        "blocks_writes": writer["blocked"],
        "rewrites_table": node_after != node_before,
        "scans_table": scans > 0,
        "referenced_table_lock": held[parent] if case.references else None,
        "blocks_referenced_writes": ref_writer["blocked"] if ref_writer else None,
        "ddl_ms": ddl_s * 1000,
    }


def _observe_concurrent(engine: Engine, name: str, sql: str, child: str, lock_timeout: str) -> dict:
    """CREATE INDEX CONCURRENTLY, observed while it waits for an open writer transaction to end."""
    with psycopg.connect(**conninfo(engine, APP + "_writer")) as writer:
        writer.execute(WRITE_SQL.format(c=child).replace("id = 2", "id = 3"))  # an open writer: CIC must wait
        with psycopg.connect(**conninfo(engine, APP + "_ddl"), autocommit=True) as ddl:
            pid = ddl.info.backend_pid
            node_before = ddl.execute(
                "SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)", (child,)
            ).fetchone()[0]
            ddl.execute("SET statement_timeout = '20s'")
            outcome: dict = {}

            def build():
                t0 = time.perf_counter()
                try:
                    ddl.execute(sql)
                    outcome["sqlstate"] = None
                except psycopg.Error as exc:
                    outcome["sqlstate"] = exc.sqlstate
                outcome["ddl_s"] = time.perf_counter() - t0

            thread = threading.Thread(target=build, daemon=True)
            thread.start()
            try:
                waiting = wait_until(lambda: writer.info.backend_pid in blocked_by(engine, pid), timeout_s=10)
                if not waiting:
                    raise RuntimeError("CREATE INDEX CONCURRENTLY never waited for the open writer")
                held = _table_locks(engine, pid, [child])
                reader = probe(engine, READ_SQL.format(c=child), lock_timeout)
                other_writer = probe(engine, WRITE_SQL.format(c=child), lock_timeout)
            finally:
                writer.commit()  # the build goes on once the writer's transaction is over
                thread.join(30)
            if outcome.get("sqlstate"):
                raise RuntimeError(f"{sql!r} failed with SQLSTATE {outcome['sqlstate']}")
            node_after, valid = ddl.execute(
                "SELECT (SELECT relfilenode FROM pg_class WHERE oid = to_regclass(%s)), "
                "(SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s))",
                (child, child.rsplit(".", 1)[0] + ".child_n_idx"),
            ).fetchone()
    return {
        "ddl": name,
        "sql": sql.replace(child.rsplit(".", 1)[0] + ".", ""),
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


def ddl_table(engine: Engine, names=None, schema: str = "wb_migrations", lock_timeout: str = "200ms") -> pd.DataFrame:
    """observe_ddl for every case (or ``names``): one row per DDL statement."""
    probes = {k: psycopg.connect(**conninfo(engine, APP + "_probe")) for k in ("read", "write", "write_ref")}
    try:
        rows = [observe_ddl(engine, n, schema, lock_timeout, probes=probes) for n in (names or DDL_CASES)]
    finally:
        for conn in probes.values():
            conn.close()
    with psycopg.connect(**conninfo(engine), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {schema}.child, {schema}.parent")
    return pd.DataFrame(rows).set_index("ddl")


# ----------------------------------------------------------------------------- the load generator
@dataclass
class LoadResult:
    """Every operation the load ran: start time (s from the load's start), kind, wait, SQLSTATE."""

    ops: pd.DataFrame
    duration_s: float
    marks: dict[str, float] = field(default_factory=dict)

    def longest_wait(self, kind: str = "write") -> float:
        """The longest single operation of ``kind`` (s): how long some user waited."""
        part = self.ops[self.ops["kind"] == kind]
        return float(part["wait_s"].max()) if len(part) else float("nan")

    def errors(self, kind: str | None = None) -> int:
        """Operations that ended with an error (of ``kind`` when given)."""
        part = self.ops if kind is None else self.ops[self.ops["kind"] == kind]
        return int(part["sqlstate"].notna().sum())

    def throughput(self, bin_s: float = 0.1) -> pd.DataFrame:
        """Completed operations per second in bins of ``bin_s``, by kind (columns t_s, kind, ops_per_s)."""
        ops = self.ops[self.ops["sqlstate"].isna()].copy()
        ops["t_end"] = ops["t_s"] + ops["wait_s"]
        bins = pd.Series(range(int(self.duration_s / bin_s) + 1), dtype=float) * bin_s
        frames = []
        for kind in sorted(self.ops["kind"].unique()):
            counts = (ops.loc[ops["kind"] == kind, "t_end"] // bin_s * bin_s).round(6).value_counts()
            frames.append(
                pd.DataFrame(
                    {
                        "t_s": bins.round(6),
                        "kind": kind,
                        "ops_per_s": [counts.get(round(b, 6), 0) / bin_s for b in bins],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


class Load:
    """Readers and writers on their own connections, each op a short autocommit statement, bounded in time.

    ``with Load(engine, write_sql=..., read_sql=...) as load: <migrate>`` then ``load.result``.
    The SQL takes one parameter ``%(id)s`` drawn (seeded) from ``ids``. Every op is bounded by
    ``lock_timeout``; the whole load stops by itself after ``max_s`` seconds.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        write_sql: str | None = None,
        read_sql: str | None = None,
        ids: range = range(1, 1001),
        writers: int = 2,
        readers: int = 1,
        rate_per_s: float = 100,
        max_s: float = 30.0,
        lock_timeout: str = "10s",
        seed: int = 6,
        app: str = APP + "_load",
    ):
        self.engine, self.ids, self.rate, self.max_s, self.lock_timeout, self.app = (
            engine,
            ids,
            rate_per_s,
            max_s,
            lock_timeout,
            app,
        )
        self.plan = [("write", write_sql, seed + i) for i in range(writers if write_sql else 0)]
        self.plan += [("read", read_sql, seed + 100 + i) for i in range(readers if read_sql else 0)]
        self._stop = threading.Event()
        self._ops: list[tuple] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(len(self.plan) + 1)
        self.marks: dict[str, float] = {}
        self.result: LoadResult | None = None

    def _worker(self, kind: str, sql: str, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(**conninfo(self.engine, self.app), autocommit=True) as conn:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (self.lock_timeout,))
            conn.execute("SELECT set_config('statement_timeout', '20s', false)")
            self._ready.wait(10)
            next_at = time.perf_counter()
            while not self._stop.is_set() and time.perf_counter() - self.t0 < self.max_s:
                t_start = time.perf_counter()
                try:
                    conn.execute(sql, {"id": rng.choice(self.ids)})
                    sqlstate = None
                except psycopg.Error as exc:
                    sqlstate = exc.sqlstate
                t_end = time.perf_counter()
                with self._lock:
                    self._ops.append((t_start - self.t0, kind, t_end - t_start, sqlstate))
                next_at = max(next_at + 1 / self.rate, t_end)
                self._stop.wait(max(0.0, next_at - time.perf_counter()))  # pacing, decides nothing

    def start(self) -> Load:
        self.t0 = time.perf_counter()
        for kind, sql, seed in self.plan:
            t = threading.Thread(target=self._worker, args=(kind, sql, seed), daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait(10)
        self.t0 = time.perf_counter()
        return self

    def mark(self, label: str) -> float:
        """Note the time (s from the load's start) of an event, e.g. 'migration starts'."""
        self.marks[label] = time.perf_counter() - self.t0
        return self.marks[label]

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        duration = time.perf_counter() - self.t0
        ops = pd.DataFrame(self._ops, columns=["t_s", "kind", "wait_s", "sqlstate"]).sort_values("t_s")
        self.result = LoadResult(ops.reset_index(drop=True), duration, dict(self.marks))
        return self.result

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def hold_transaction(
    engine: Engine,
    statements: list[str],
    hold_s: float,
    lock_timeout: str = "10s",
    app: str = APP + "_migration",
    after: Callable[[], object] | None = None,
) -> float:
    """Run ``statements`` in one transaction kept open ``hold_s`` more seconds (a scripted window); returns s.

    ``after`` is called once the statements have run (their locks are held), before the window.
    """
    t0 = time.perf_counter()
    with psycopg.connect(**conninfo(engine, app)) as conn:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        for stmt in statements:
            conn.execute(stmt)
        if after is not None:
            after()
        time.sleep(hold_s)  # stands for the long part of a migration on a big table
        conn.commit()
    return time.perf_counter() - t0


def migrate_with_retry(
    engine: Engine,
    statements: list[str],
    lock_timeout: str = "100ms",
    attempts: int = 50,
    backoff_s: float = 0.05,
    app: str = APP + "_migration",
) -> pd.DataFrame:
    """Run ``statements`` in one transaction with a short lock_timeout, retrying on 55P03; one row per attempt."""
    rows = []
    for attempt in range(1, attempts + 1):
        t0 = time.perf_counter()
        with psycopg.connect(**conninfo(engine, app)) as conn:
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
                for stmt in statements:
                    conn.execute(stmt)
                conn.commit()
                sqlstate = None
            except psycopg.errors.LockNotAvailable as exc:
                conn.rollback()
                sqlstate = exc.sqlstate
        rows.append({"attempt": attempt, "sqlstate": sqlstate, "s": time.perf_counter() - t0})
        if sqlstate is None:
            break
        time.sleep(backoff_s * min(attempt, 4))  # back off, then try again: readers got through meanwhile
    return pd.DataFrame(rows)


_WAITING_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name LIKE %s AND cardinality(pg_blocking_pids(pid)) > 0"
)


def waiting(engine: Engine, app_like: str) -> int:
    """How many backends whose application_name is LIKE ``app_like`` are waiting for a lock now."""
    with engine.connect() as conn:
        return int(conn.execute(text(_WAITING_SQL.replace("%s", ":app")), {"app": app_like}).scalar())


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
        with psycopg.connect(**conninfo(self.engine, APP + "_observer"), autocommit=True) as conn:
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


def invalid_indexes(engine: Engine) -> list[str]:
    """Indexes left INVALID (pg_index.indisvalid = false), e.g. by a failed CREATE INDEX CONCURRENTLY."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1"))
        return [r[0] for r in rows]


# ----------------------------------------------------------------------------- Alembic
def alembic_config(engine: Engine):
    """An Alembic Config for the project in ``migrations/``, pointed at the database of ``engine``."""
    from alembic.config import Config

    from .config import REPO_ROOT

    cfg = Config(str(REPO_ROOT / "migrations" / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["url"] = engine.url.render_as_string(hide_password=False)
    return cfg
