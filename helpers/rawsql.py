"""Chapters 07a and 07b's lab and its statement instruments: the scratch tables, what a statement compiles to, plans, prepared statements.

The lessons (07a's report three ways, injection demo and allow-list; 07b's bulk methods) live in
the chapters' cells; this module holds what they write to and what measures them:

- the scratch tables of the chapters (``Note`` in 07a; ``Item``, ``Stock``, ``Event`` in 07b), declared in the
  placeholder schema ``wb_rawsql`` and translated to this kernel's ``wb_<name>_<kernel>`` by
  ``scratch_engine`` (the seeded tables are only read);
- ``sql_of`` (the SQL a construct sends), ``explain_lines`` (its plan, parameters bound) and
  ``prepared_statements`` (the server's view of a psycopg connection's prepared statements).

No SQL here is formatted from strings: identifiers go through ``psycopg.sql.Identifier``, values are bound.
"""

from __future__ import annotations

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
    String,
    Text,
    case,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .seed import lab_schema
from .waits import bounded

SCHEMA = "wb_rawsql"  # the placeholder every scratch table is declared in; scratch_engine translates it


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
    """``engine`` with the scratch tables translated to this kernel's ``wb_<name>_<kernel>`` (created if missing)."""
    schema = lab_schema(engine, name)
    return engine.execution_options(schema_translate_map={SCHEMA: schema})


def schema_of(engine: Engine) -> str:
    """The scratch schema this engine writes to."""
    return engine.get_execution_options().get("schema_translate_map", {}).get(SCHEMA, SCHEMA)


def qualified(engine: Engine, table: str) -> pgsql.Identifier:
    """``schema.table`` of a scratch table as a psycopg identifier (for COPY, TRUNCATE, VACUUM)."""
    return pgsql.Identifier(schema_of(engine), table)


def run_composed(conn, query: pgsql.Composable) -> None:
    """Run a ``psycopg.sql`` composition on a SQLAlchemy connection (its driver connection quotes it)."""
    raw = conn.connection.driver_connection
    conn.exec_driver_sql(query.as_string(raw))


def create_scratch(engine: Engine) -> str:
    """Drop and re-create the scratch tables (only they) so a run starts clean; returns the schema."""
    with engine.begin() as conn, bounded(conn, "re-creating chapters 07a and 07b's scratch tables"):
        ScratchBase.metadata.drop_all(conn)
        ScratchBase.metadata.create_all(conn)
    return schema_of(engine)


def fill_events(engine: Engine, n: int) -> None:
    """n events made on the server (doc {"kind", "user_id", "amount"}: kind 1 in 5, user_id 1 in 997;
    tags: "urgent" ~1 %), then VACUUM ANALYZE (which moves the GIN pending list into the index proper:
    the planner prices a long pending list high)."""
    t = Event.__table__
    g = func.generate_series(1, n).column_valued("g")
    doc = func.jsonb_build_object("kind", "kind-" + (g % 5).cast(Text), "user_id", 1 + g % 997, "amount", g % 500)
    tags = case(
        (g % 97 == 0, postgresql.array(["urgent", "billing"], type_=Text)),
        else_=postgresql.array(["tag-" + (g % 13).cast(Text)]),
    )
    with engine.begin() as conn, bounded(conn, "filling chapter 07b's events"):
        run_composed(conn, pgsql.SQL("TRUNCATE {}").format(qualified(engine, "events")))
        conn.execute(insert(t).from_select(["id", "doc", "tags"], select(g, doc, tags)))
    vacuum = pgsql.SQL("VACUUM ANALYZE {}").format(qualified(engine, "events"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        with bounded(conn, "vacuuming chapter 07b's events", session=True):
            run_composed(conn, vacuum)


# ----------------------------------------------------------------------------- what a statement is
def sql_of(stmt) -> str:
    """The SQL text a Core/ORM construct compiles to for PostgreSQL (parameters as placeholders)."""
    return str(stmt.compile(dialect=postgresql.dialect()))


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


def prepared_statements(pc, pattern: str = "%") -> pd.DataFrame:
    """A psycopg connection's prepared statements whose text is LIKE ``pattern`` (psycopg names them
    ``_pg3_<n>``), with how many times the server ran a generic and a custom plan for each."""
    cols = ["name", "statement", "types", "generic_plans", "custom_plans"]
    rows = pc.execute(
        "SELECT name, statement, parameter_types::text, generic_plans, custom_plans "
        "FROM pg_prepared_statements WHERE statement LIKE %s ORDER BY prepare_time",
        (pattern,),
    ).fetchall()
    return pd.DataFrame(rows, columns=cols)


def plan_of_prepared(pc, name: str, arg, mode: str | None = None) -> list[str]:
    """EXPLAIN EXECUTE of prepared statement ``name`` with one argument, optionally under a
    transaction-local ``plan_cache_mode`` (``force_custom_plan`` / ``force_generic_plan``)."""
    query = pgsql.SQL("EXPLAIN EXECUTE {}({})").format(pgsql.Identifier(name), pgsql.Literal(arg))
    with pc.transaction():
        if mode:
            pc.execute("SELECT set_config('plan_cache_mode', %s, true)", (mode,))
        return [r[0] for r in pc.execute(query)]
