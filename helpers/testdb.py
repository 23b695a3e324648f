"""Databases of a chapter's (or a test run's) own that never depend on who else is connected.

``schema_database`` is the test database per run: the workbook schema, no rows. ``copied_database``
adds a COPY of chosen seeded rows only (``clone_database`` copies all of them). Both carry the
clone marker, so ``drop_database(suffix)`` removes them.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy import Engine, text

from . import models
from .database import empty_database, psycopg_conninfo, try_create_extension


def schema_database(suffix: str, **engine_kw) -> Engine:
    """A new database ``<workbook db>_<suffix>`` with the workbook schema and no rows (a test run's database).

    pg_stat_statements is created in it when this role may.
    """
    engine = empty_database(suffix, **engine_kw)
    models.Base.metadata.create_all(engine)
    try_create_extension(engine, "pg_stat_statements")
    return engine


def copied_database(suffix: str, tables: dict[str, str | None], **engine_kw) -> Engine:
    """A database of one's own with some seeded rows: ``{table: WHERE condition or None for all rows}``.

    Always the same rows for the same arguments (no dependence on who is connected); ANALYZEd.
    """
    engine = schema_database(suffix, **engine_kw)
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
                conn.execute(
                    text(f"SELECT setval(:s, coalesce((SELECT max(id) FROM {quoted}), 0) + 1, false)"), {"s": seq}
                )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    return engine
