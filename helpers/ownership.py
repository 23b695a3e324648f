"""What the workbook owns in a database, proven object by object: the marker, the stamps, the guard.

A name is no proof. The marker ``workbook_meta`` records the OID of every table the seed created
and of every scratch schema ``lab_schema`` created, and each carries the marker's stamp; seeding and
resets refuse to run in a database holding anything else. ``force=True`` seeds beside foreign tables
but never drops one, and refuses when one has the name of a workbook table.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from sqlalchemy import Engine, column, select, table, text

from . import models
from .config import WorkbookError
from .dataset import schema_version
from .waits import bounded

MARKER_TABLE = "workbook_meta"
OWNER_COMMENT = "qo-workbook"

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


def seeded_info(engine: Engine) -> dict | None:
    """The marker's contents (scale, seed, schema_version, ...) or None when not seeded."""
    with engine.connect() as conn:
        if conn.execute(text("SELECT to_regclass(:t)"), {"t": f"public.{MARKER_TABLE}"}).scalar() is None:
            return None
        return dict(conn.execute(select(column("key"), column("value")).select_from(table(MARKER_TABLE))).all())


def is_seeded(engine: Engine, scale: str, seed: int) -> bool:
    """True when the database holds a complete seed of this scale, seed and generator."""
    info = seeded_info(engine) or {}
    return (
        info.get("complete") == "true"
        and info.get("scale") == scale
        and info.get("seed") == str(seed)
        and info.get("schema_version") == schema_version()
    )


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
