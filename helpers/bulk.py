"""Chapter 07 (raw SQL vs ORM): the report three ways, safe identifiers, bulk writes and reads as benchmarks.

In the spirit of SQLAlchemy's ``examples/performance``: a benchmark is a named function
``fn(engine, n)`` and ``helpers.measure`` does the repetition. Writes go only to the scratch
schema ``wb_rawsql`` (``scratch_engine``/``create_scratch``); the seeded tables are only read.
``scratch_engine(engine, "rawsql_test")`` points every function at another scratch schema.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd
from psycopg import sql as pgsql
from sqlalchemy import (
    ClauseElement,
    Engine,
    Executable,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    any_,
    bindparam,
    column,
    func,
    insert,
    literal,
    select,
    text,
    update,
    values,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .models import Comment, Order, User
from .scratch import lab_schema

SCHEMA = "wb_rawsql"


# ----------------------------------------------------------------------------- scratch tables
class ScratchBase(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class Item(ScratchBase):
    """The bulk-write target: an identity key and two payload columns."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    value: Mapped[int] = mapped_column(Integer)


class Note(ScratchBase):
    """The injection demo's victim table (the only table a payload is allowed to drop)."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(Text)


class Stock(ScratchBase):
    """Upsert target: one row per SKU."""

    __tablename__ = "stock"

    sku: Mapped[str] = mapped_column(String(20), primary_key=True)
    qty: Mapped[int] = mapped_column(Integer)


class Event(ScratchBase):
    """JSONB document and text[] tags, each with a GIN index."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_doc", "doc", postgresql_using="gin"),
        Index("ix_events_tags", "tags", postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    doc: Mapped[dict] = mapped_column(JSONB)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text))


def scratch_engine(engine: Engine, name: str = "rawsql") -> Engine:
    """``engine`` with the scratch tables translated to ``wb_<name>`` (created if missing)."""
    schema = lab_schema(engine, name)
    return engine.execution_options(schema_translate_map={SCHEMA: schema})


def schema_of(engine: Engine) -> str:
    """The scratch schema this engine writes to."""
    return engine.get_execution_options().get("schema_translate_map", {}).get(SCHEMA, SCHEMA)


LOCK_TIMEOUT = "10s"  # DDL and TRUNCATE on the scratch tables never wait longer than this


def _bounded(conn) -> None:
    conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": LOCK_TIMEOUT})


def create_scratch(engine: Engine) -> str:
    """Drop and re-create the scratch tables (only they) so a run starts clean; returns the schema."""
    with engine.begin() as conn:
        _bounded(conn)
        ScratchBase.metadata.drop_all(conn)
        ScratchBase.metadata.create_all(conn)
    return schema_of(engine)


def _qualified(engine: Engine, table: str) -> pgsql.Composed:
    return pgsql.Identifier(schema_of(engine), table)


def truncate_items(engine: Engine) -> None:
    """Empty the bulk-write target and restart its identity."""
    with engine.begin() as conn:
        _bounded(conn)
        conn.execute(text(f"TRUNCATE {_qualified(engine, 'items').as_string()} RESTART IDENTITY"))


def fill_items(engine: Engine, n: int) -> None:
    """Truncate, then insert rows 1..n server-side (the untimed set-up of the update benchmarks)."""
    truncate_items(engine)
    insert_select(engine, n)


def fill_events(engine: Engine, n: int) -> None:
    """n events made on the server: doc {"kind", "user_id", "amount"} (kind 1 in 5, user_id 1 in 997), tags (urgent ~1 %), then VACUUM ANALYZE."""
    table = _qualified(engine, "events").as_string()
    with engine.begin() as conn:
        _bounded(conn)
        conn.execute(text(f"TRUNCATE {table}"))
        conn.execute(
            text(f"""
            INSERT INTO {table} (id, doc, tags)
            SELECT g,
                   jsonb_build_object('kind', 'kind-' || (g % 5), 'user_id', 1 + g % 997, 'amount', g % 500),
                   CASE WHEN g % 97 = 0 THEN ARRAY['urgent', 'billing'] ELSE ARRAY['tag-' || (g % 13)] END
            FROM generate_series(1, :n) AS g"""),
            {"n": n},
        )
    # VACUUM moves the GIN pending list into the index proper; the planner prices a long pending list high
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT set_config('lock_timeout', :v, false)"), {"v": LOCK_TIMEOUT})
        try:
            conn.execute(text(f"VACUUM ANALYZE {table}"))
        finally:
            conn.execute(text("RESET lock_timeout"))


class _Explain(Executable, ClauseElement):
    inherit_cache = False

    def __init__(self, statement):
        self.statement = statement


@compiles(_Explain, "postgresql")
def _compile_explain(element, compiler, **kw):
    return "EXPLAIN " + compiler.process(element.statement, **kw)


def explain_lines(conn, statement, params: dict | None = None) -> list[str]:
    """The text EXPLAIN of a Core/ORM statement, bound parameters and all (one line per plan line)."""
    return [row[0] for row in conn.execute(_Explain(statement), params or {})]


# ----------------------------------------------------------------------------- bulk inserts
def rows_for(n: int) -> list[dict]:
    """The n rows every insert benchmark writes (as dicts)."""
    return [{"name": f"item {i}", "value": i} for i in range(1, n + 1)]


def orm_add_all(engine: Engine, n: int) -> None:
    """Unit of work: n Item objects, add_all, commit (insertmanyvalues: one INSERT ... RETURNING per 1000 rows)."""
    with Session(engine) as session:
        session.add_all([Item(name=f"item {i}", value=i) for i in range(1, n + 1)])
        session.commit()


def orm_bulk_insert(engine: Engine, n: int) -> None:
    """ORM bulk INSERT: session.execute(insert(Item), list of dicts) -> one executemany, no objects."""
    with Session(engine) as session:
        session.execute(insert(Item), rows_for(n))
        session.commit()


def core_executemany(engine: Engine, n: int) -> None:
    """Core insert() with a list of dicts: one executemany (psycopg 3 pipelines the rows)."""
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows_for(n))


def insert_select(engine: Engine, n: int) -> None:
    """INSERT ... SELECT over generate_series: the rows are made on the server, nothing crosses the wire."""
    g = func.generate_series(1, bindparam("n", type_=Integer)).column_valued("g")
    stmt = insert(Item.__table__).from_select(["name", "value"], select(literal("item ") + g.cast(Text), g))
    with engine.begin() as conn:
        conn.execute(stmt, {"n": n})


def copy_rows(engine: Engine, n: int) -> None:
    """COPY ... FROM STDIN through psycopg's cursor.copy, one write_row per row."""
    query = pgsql.SQL("COPY {} (name, value) FROM STDIN").format(_qualified(engine, "items"))
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy(query) as copy:
            for i in range(1, n + 1):
                copy.write_row((f"item {i}", i))


INSERTS: dict[str, Callable[[Engine, int], None]] = {
    "orm_add_all": orm_add_all,
    "orm_bulk_insert": orm_bulk_insert,
    "core_executemany": core_executemany,
    "insert_select": insert_select,
    "copy": copy_rows,
}


# ----------------------------------------------------------------------------- bulk updates
# Every update benchmark sets value = 2 * id on rows 1..n, so all of them end in the same state.
def orm_per_object(engine: Engine, n: int) -> None:
    """Load n objects, change an attribute on each, commit (the flush groups the UPDATEs by PK)."""
    with Session(engine) as session:
        for item in session.scalars(select(Item).where(Item.id <= n)):
            item.value = 2 * item.id
        session.commit()


def orm_bulk_update(engine: Engine, n: int) -> None:
    """ORM bulk UPDATE by primary key: session.execute(update(Item), list of dicts with "id")."""
    with Session(engine) as session:
        session.execute(update(Item), [{"id": i, "value": 2 * i} for i in range(1, n + 1)])
        session.commit()


VALUES_CHUNK = 10_000  # 2 bound parameters per row; PostgreSQL allows 65 535 per statement


def update_from_values(engine: Engine, n: int) -> None:
    """One UPDATE ... FROM (VALUES ...) per 10 000 rows (Core ``values()``)."""
    items = Item.__table__
    with engine.begin() as conn:
        for start in range(1, n + 1, VALUES_CHUNK):
            ids = range(start, min(n, start + VALUES_CHUNK - 1) + 1)
            v = values(column("id", Integer), column("value", Integer), name="v").data([(i, 2 * i) for i in ids])
            conn.execute(update(items).where(items.c.id == v.c.id).values(value=v.c.value))


def update_from_unnest(engine: Engine, n: int) -> None:
    """One UPDATE ... FROM unnest(:ids, :values) at any n: two array parameters."""
    items = Item.__table__
    v = (
        func.unnest(bindparam("ids", type_=ARRAY(Integer)), bindparam("vals", type_=ARRAY(Integer)))
        .table_valued("id", "value")
        .render_derived(name="v")
    )
    stmt = update(items).where(items.c.id == v.c.id).values(value=v.c.value)
    ids = list(range(1, n + 1))
    with engine.begin() as conn:
        conn.execute(stmt, {"ids": ids, "vals": [2 * i for i in ids]})


UPDATES: dict[str, Callable[[Engine, int], None]] = {
    "orm_per_object": orm_per_object,
    "orm_bulk_update": orm_bulk_update,
    "update_from_values": update_from_values,
    "update_from_unnest": update_from_unnest,
}


# ----------------------------------------------------------------------------- reading many rows
def comments_query(n: int):
    """The first n comments by id: five columns, ~60-110 byte bodies."""
    return select(Comment).order_by(Comment.id).limit(n)


def read_orm_objects(engine: Engine, n: int) -> int:
    """Comment objects, all in a list (identity map, instrumentation)."""
    with Session(engine) as session:
        return len(session.scalars(comments_query(n)).all())


def read_rows(engine: Engine, n: int) -> int:
    """Row tuples of the same columns, all in a list (no ORM objects)."""
    t = Comment.__table__
    with engine.connect() as conn:
        return len(conn.execute(select(t).order_by(t.c.id).limit(n)).all())


def read_yield_per(engine: Engine, n: int) -> int:
    """Comment objects streamed 1000 at a time through a server-side cursor; none are kept."""
    count = 0
    with Session(engine) as session:
        for _ in session.scalars(comments_query(n).execution_options(yield_per=1000)):
            count += 1
    return count


def read_pandas(engine: Engine, n: int) -> int:
    """pandas.read_sql into a DataFrame."""
    t = Comment.__table__
    with engine.connect() as conn:
        return len(pd.read_sql(select(t).order_by(t.c.id).limit(n), conn))


READS: dict[str, Callable[[Engine, int], int]] = {
    "orm_objects": read_orm_objects,
    "row_tuples": read_rows,
    "orm_yield_per": read_yield_per,
    "pandas_read_sql": read_pandas,
}


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """(result, peak bytes allocated by Python while ``fn`` ran), measured with tracemalloc."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak


def rows_per_s(timings: pd.DataFrame) -> pd.DataFrame:
    """Add ``rows_per_s`` (n / median_s) to a ``measure`` sweep labelled with ``n``."""
    out = timings.copy()
    out["rows_per_s"] = out["n"] / out["median_s"]
    return out


# ----------------------------------------------------------------------------- the report, three ways
REPORT_STATUSES = ("paid", "shipped")

REPORT_SQL = """
WITH spend AS (
    SELECT o.user_id, sum(o.total) AS spent, count(*) AS orders
    FROM orders AS o
    WHERE o.status = ANY(:statuses)
    GROUP BY o.user_id
), ranked AS (
    SELECT u.region, u.id AS user_id, u.name, s.spent, s.orders,
           row_number() OVER (PARTITION BY u.region ORDER BY s.spent DESC, u.id) AS rank
    FROM spend AS s JOIN users AS u ON u.id = s.user_id
)
SELECT region, user_id, name, spent, orders, rank
FROM ranked
WHERE rank <= :top_n
ORDER BY region, rank
"""

REPORT_COLUMNS = ["region", "user_id", "name", "spent", "orders", "rank"]


def report_text(top_n: int = 3):
    """Hand-written SQL in text(), bound parameters, result columns typed with .columns()."""
    return (
        text(REPORT_SQL)
        .bindparams(bindparam("statuses", list(REPORT_STATUSES), type_=ARRAY(String)), bindparam("top_n", top_n))
        .columns(region=String, user_id=Integer, name=String, spent=Numeric(12, 2), orders=Integer, rank=Integer)
    )


def report_core(top_n: int = 3):
    """The same query from Core Table objects: select().cte() and func.row_number().over()."""
    orders, users = Order.__table__, User.__table__
    spend = (
        select(orders.c.user_id, func.sum(orders.c.total).label("spent"), func.count().label("orders"))
        .where(orders.c.status.in_(REPORT_STATUSES))
        .group_by(orders.c.user_id)
        .cte("spend")
    )
    ranked = (
        select(
            users.c.region,
            users.c.id.label("user_id"),
            users.c.name,
            spend.c.spent,
            spend.c.orders,
            func.row_number()
            .over(partition_by=users.c.region, order_by=(spend.c.spent.desc(), users.c.id))
            .label("rank"),
        )
        .join_from(users, spend, spend.c.user_id == users.c.id)
        .cte("ranked")
    )
    return select(*ranked.c).where(ranked.c.rank <= top_n).order_by(ranked.c.region, ranked.c.rank)


def report_orm(top_n: int = 3):
    """The same query from the mapped classes (run with Session.execute)."""
    spend = (
        select(Order.user_id, func.sum(Order.total).label("spent"), func.count().label("orders"))
        .where(Order.status.in_(REPORT_STATUSES))
        .group_by(Order.user_id)
        .cte("spend")
    )
    rank = func.row_number().over(partition_by=User.region, order_by=(spend.c.spent.desc(), User.id))
    ranked = (
        select(User.region, User.id.label("user_id"), User.name, spend.c.spent, spend.c.orders, rank.label("rank"))
        .join(spend, spend.c.user_id == User.id)
        .cte("ranked")
    )
    return select(*ranked.c).where(ranked.c.rank <= top_n).order_by(ranked.c.region, ranked.c.rank)


def report_python(session: Session, top_n: int = 3) -> list[tuple]:
    """The anti-pattern: load the orders and users as objects and rank them in Python."""
    spent: dict[int, Decimal] = {}
    counts: dict[int, int] = {}
    for o in session.scalars(select(Order).where(Order.status.in_(REPORT_STATUSES))):
        spent[o.user_id] = spent.get(o.user_id, Decimal(0)) + o.total
        counts[o.user_id] = counts.get(o.user_id, 0) + 1
    # one array parameter, not one bound value per id: an IN list of every customer passes
    # PostgreSQL's 65,535-parameter limit at `large` (200,000 users)
    ids = bindparam("ids", list(spent), type_=ARRAY(Integer))
    users = {u.id: u for u in session.scalars(select(User).where(User.id == any_(ids)))}
    by_region: dict[str, list] = {}
    for uid, total in spent.items():
        by_region.setdefault(users[uid].region, []).append((-total, uid))
    out = []
    for region in sorted(by_region):
        for rank, (neg, uid) in enumerate(sorted(by_region[region])[:top_n], start=1):
            out.append((region, uid, users[uid].name, -neg, counts[uid], rank))
    return out


@dataclass(frozen=True)
class TopCustomer:
    """One report row as a typed, immutable value."""

    region: str
    user_id: int
    name: str
    spent: Decimal
    orders: int
    rank: int


# ----------------------------------------------------------------------------- identifiers and injection
#: what a caller may sort users by: public names -> columns (never the raw input)
SORTABLE = {"name": User.name, "email": User.email, "region": User.region, "created": User.created_at}


def sort_column(name: str):
    """Map user input to a column through the allow-list; anything else is a ValueError."""
    try:
        return SORTABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"cannot sort by {name!r}; choose one of {sorted(SORTABLE)}") from None


def users_sorted(session: Session, sort: str, limit: int = 5) -> list[tuple]:
    """Users ordered by a caller-chosen column, safely."""
    return session.execute(select(User.id, User.name).order_by(sort_column(sort), User.id).limit(limit)).all()


def orders_unsafe(conn, user_id: int, status: str) -> list[tuple]:
    """DON'T: user input formatted into the SQL string."""
    return conn.execute(
        text(f"SELECT id, status, total::text FROM orders WHERE user_id = {int(user_id)} AND status = '{status}'")
    ).all()


def orders_safe(conn, user_id: int, status: str) -> list[tuple]:
    """DO: the same query with bound parameters; the input is only ever a value."""
    return conn.execute(
        text("SELECT id, status, total::text FROM orders WHERE user_id = :user_id AND status = :status"),
        {"user_id": user_id, "status": status},
    ).all()
