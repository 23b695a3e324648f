"""Databases of a chapter's (or a test run's) own that never depend on who else is connected.

``empty_database`` is the test database per run: the workbook schema, no rows. ``copied_database``
adds a COPY of chosen seeded rows: the same rows every time, in about a second, where
``clone_database`` re-seeds everything (tens of seconds) whenever anyone else is connected to
the workbook database, which on a shared server is nearly always. Both carry the clone
marker, so ``drop_database(suffix)`` and ``reset`` remove them.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine, text

from . import models
from .database import CLONE_COMMENT, _libpq_kwargs, database_url, drop_database, psycopg_conninfo


def _admin():
    return psycopg.connect(**_libpq_kwargs(database_url().set(database="postgres")), autocommit=True)


def database_name(suffix: str) -> str:
    """``<workbook db>_<suffix>``, the name ``drop_database(suffix)`` drops."""
    if not suffix.replace("_", "").isalnum() or suffix.lower() != suffix:
        raise ValueError(f"suffix must be lower-case letters, digits, underscores: {suffix!r}")
    return f"{database_url().database}_{suffix}"


def create_database(suffix: str, template: str = "template0") -> str:
    """CREATE DATABASE ``<db>_<suffix>`` TEMPLATE ``template`` (dropping an earlier one); returns its name."""
    name = database_name(suffix)
    drop_database(suffix)
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(CLONE_COMMENT)))
    return name


def empty_database(suffix: str, **engine_kw) -> Engine:
    """A new database with the workbook schema and no rows (the test database of a run)."""
    name = create_database(suffix)
    engine = create_engine(database_url().set(database=name), **engine_kw)
    models.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        try:
            with conn.begin_nested():
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        except Exception:  # noqa: BLE001 - not superuser on a shared server: chapters check and explain
            pass
    return engine


def copied_database(suffix: str, tables: dict[str, str | None], **engine_kw) -> Engine:
    """A database of one's own with some seeded rows: ``{table: WHERE condition or None for all rows}``.

    Always the same rows for the same arguments (no dependence on who is connected); ANALYZEd.
    """
    engine = empty_database(suffix, **engine_kw)
    with psycopg.connect(**psycopg_conninfo()) as src, psycopg.connect(**psycopg_conninfo(engine.url.database)) as dst:
        for table, where in tables.items():
            ident = sql.Identifier(table)
            source = sql.SQL("(SELECT * FROM {} WHERE {})").format(ident, sql.SQL(where)) if where else ident
            with (
                src.cursor().copy(sql.SQL("COPY {} TO STDOUT (FORMAT BINARY)").format(source)) as out,
                dst.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(ident)) as inp,
            ):
                for data in out:
                    inp.write(data)
        dst.commit()
    with engine.begin() as conn:
        for table in tables:
            seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
            if seq:
                quoted = conn.dialect.identifier_preparer.quote(table)
                conn.execute(text(f"SELECT setval(:s, coalesce((SELECT max(id) FROM {quoted}), 0) + 1, false)"), {"s": seq})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    return engine
