"""Names of a kernel's own, so two learners (or one learner's two kernels) on one database never collide.

Scratch schemas (``lab_schema``), clone databases (``clone_database``, ``empty_database``) and roles
carry the suffix ``scratch_suffix()``: ``k<pid>_<host tag><random>``, fixed for the life of a process
(a forked child gets its own). Two kernels, on one machine or on two, get different names.

Ownership is proven, never read from a name:
- this process records every object it created (name, OID and stamp) in a process-local registry;
  ``drop_lab_schema`` and ``drop_database`` drop only what is in it, still carrying the same OID and stamp;
- a scratch schema counts as created here only when ``pg_namespace`` shows it was inserted by our own
  transaction (``xmin``), so ``CREATE SCHEMA IF NOT EXISTS`` never adopts someone else's schema;
- ``python -m helpers reset`` removes the leftovers of kernels that are gone (stamped by the workbook,
  named with a suffix of this machine whose process no longer exists) and keeps those of live kernels.
At a normal exit a process drops what it still has in the registry (a safety net for interrupted
notebooks and tests); a killed kernel's leftovers wait for ``reset``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass

import psycopg
from psycopg import sql
from sqlalchemy import Engine

from .config import WorkbookError
from .database import CLONE_COMMENT, database_url, libpq_kwargs
from .ownership import MARKER_TABLE, _adopt_legacy, _record, _x, ownership
from .processes import alive
from .waits import bounded

ROLE_COMMENT = "qo-workbook role"
_SCHEMA_LOCK_KEY = 0x514F5753  # pg_advisory_xact_lock key serialising lab_schema calls (one database)
MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently: we refuse them instead
_SUFFIX_RE = re.compile(r"_k(?P<pid>\d+)_(?P<host>[0-9a-f]{4})[0-9a-f]{4}$")

_suffix: tuple[int, str] | None = None  # (pid it was made in, suffix)


def _host_tag(hostname: str | None = None) -> str:
    """4 hex digits standing for this machine (its host name), so reset never judges another machine's pids."""
    return hashlib.sha256((hostname or socket.gethostname()).encode()).hexdigest()[:4]


def scratch_suffix() -> str:
    """``k<pid>_<host tag><random>``: unique to this process (and this machine), the same on every call."""
    global _suffix
    pid = os.getpid()
    if _suffix is None or _suffix[0] != pid:  # a forked child is another kernel
        _suffix = (pid, f"k{pid}_{_host_tag()}{secrets.token_hex(2)}")
    return _suffix[1]


def scratch_name(base: str) -> str:
    """``<base>_<scratch_suffix()>``, checked: lower-case letters, digits, underscores, at most 63 bytes."""
    name = f"{base}_{scratch_suffix()}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"a scratch name takes lower-case letters, digits and underscores: {base!r}")
    if len(name.encode()) > MAX_IDENTIFIER:
        raise WorkbookError(
            f"The name {name!r} is longer than PostgreSQL's {MAX_IDENTIFIER} bytes (it would be cut short). "
            "Use a shorter name (or a shorter WORKBOOK_DB)."
        )
    return name


def owner_alive(name: str) -> bool | None:
    """Whether the process that named ``name`` still runs: True/False for a suffix of this machine,
    None when the name has no suffix or was made on another machine (its pids mean nothing here)."""
    m = _SUFFIX_RE.search(name)
    if not m or m.group("host") != _host_tag():
        return None
    pid = int(m.group("pid"))
    # a reused pid counts as alive (keep rather than guess); a zombie has exited: its kernel is gone
    return pid == os.getpid() or alive(pid)


# ----------------------------------------------------------------------------- the process-local registry
@dataclass(frozen=True)
class _Made:
    kind: str  # "schema" | "database" | "role"
    name: str
    database: str | None  # the schema's database; None for databases and roles
    oid: int
    stamp: str
    pid: int


_made: dict[tuple[str, str | None, str], _Made] = {}


def _key(kind: str, name: str, database: str | None = None) -> tuple[str, str | None, str]:
    return (kind, database, name)


def made_here(kind: str, name: str, database: str | None = None) -> bool:
    """True when this process created ``name`` (and has not dropped it)."""
    made = _made.get(_key(kind, name, database))
    return made is not None and made.pid == os.getpid()


def remember_schema(conn, schema: str) -> None:
    """Record ``schema`` as this process's, inside the transaction that ran ``CREATE SCHEMA IF NOT EXISTS``.

    ``conn`` is a SQLAlchemy Connection. Raises WorkbookError (after which the caller's transaction
    rolls back) when the schema already existed and this process did not create it.
    """
    from sqlalchemy import text

    row = conn.execute(
        text(
            "SELECT n.oid, obj_description(n.oid, 'pg_namespace'), n.xmin = pg_current_xact_id()::xid, "
            "current_database() FROM pg_namespace n WHERE n.nspname = :s"
        ),
        {"s": schema},
    ).one()
    oid, stamp, created_now, database = int(row[0]), row[1], bool(row[2]), row[3]
    known = _made.get(_key("schema", schema, database))
    if created_now or (known is not None and known.pid == os.getpid() and known.oid == oid):
        _made[_key("schema", schema, database)] = _Made("schema", schema, database, oid, stamp, os.getpid())
        return
    raise WorkbookError(
        f"The schema {schema!r} already exists in {database!r} and this kernel did not create it; it was left "
        "untouched. Restart the kernel (it picks a new name), or drop that schema yourself if you know it is yours."
    )


def drop_lab_schema(engine, schema: str) -> bool:
    """Drop the scratch schema ``schema`` (CASCADE) if this process created it; True when dropped.

    Strict: a schema not in this process's registry, or whose OID or stamp changed since, raises
    WorkbookError and nothing is dropped. Returns False when it is already gone.
    """
    from sqlalchemy import text

    with engine.begin() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar()
        made = _made.get(_key("schema", schema, database))
        if made is None or made.pid != os.getpid():
            if conn.execute(text("SELECT to_regnamespace(:s)"), {"s": schema}).scalar() is None:
                return False  # nothing of that name: nothing to refuse
            raise WorkbookError(
                f"Not dropping the schema {schema!r}: this kernel did not create it (only the schemas "
                "lab_schema() made in this process are dropped here; `python -m helpers reset` removes those "
                "of kernels that are gone)."
            )
        conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": "10s"})
        row = conn.execute(
            text("SELECT oid, obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :s"),
            {"s": schema},
        ).one_or_none()
        if row is None:
            _made.pop(_key("schema", schema, database), None)
            return False
        if int(row[0]) != made.oid or row[1] != made.stamp or not (row[1] or "").startswith("qo-workbook"):
            raise WorkbookError(
                f"Not dropping the schema {schema!r}: it is no longer the one this kernel created (its OID or "
                "its qo-workbook stamp changed). It was left untouched."
            )
        if schema not in ownership(conn).schemas.values():  # the marker's record: the second proof
            raise WorkbookError(
                f"Not dropping the schema {schema!r}: the workbook's marker has no record of it (or a stamp that "
                "does not match). It was left untouched."
            )
        raw = conn.connection.driver_connection
        raw.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        raw.execute(
            sql.SQL("DELETE FROM {} WHERE key = %s").format(sql.Identifier(MARKER_TABLE)), (f"schema:{schema}",)
        )
    _made.pop(_key("schema", schema, database), None)
    return True


def remember_database(admin: psycopg.Connection, name: str, stamp: str) -> None:
    """Record a database this process has just created (``admin`` is a psycopg connection)."""
    oid = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()[0]
    _made[_key("database", name)] = _Made("database", name, None, int(oid), stamp, os.getpid())


def forget_database(name: str) -> None:
    _made.pop(_key("database", name), None)


def database_record(name: str) -> _Made | None:
    made = _made.get(_key("database", name))
    return made if made is not None and made.pid == os.getpid() else None


def create_role(conn: psycopg.Connection, base: str, options: sql.Composable | None = None) -> str:
    """CREATE ROLE ``<base>_<suffix>`` (with ``options``), stamped and recorded as this process's; its name."""
    name = scratch_name(base)
    conn.execute(sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(name), options or sql.SQL("")))
    conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(name), sql.Literal(ROLE_COMMENT)))
    oid = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (name,)).fetchone()[0]
    _made[_key("role", name)] = _Made("role", name, None, int(oid), ROLE_COMMENT, os.getpid())
    return name


def drop_role(conn: psycopg.Connection, name: str) -> bool:
    """DROP ROLE ``name`` if this process created it (same OID, same stamp); True when dropped."""
    made = _made.get(_key("role", name))
    if made is None or made.pid != os.getpid():
        raise WorkbookError(f"Not dropping the role {name!r}: this kernel did not create it.")
    row = conn.execute(
        "SELECT oid, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (name,)
    ).fetchone()
    if row is None:
        _made.pop(_key("role", name), None)
        return False
    if int(row[0]) != made.oid or row[1] != made.stamp:
        raise WorkbookError(f"Not dropping the role {name!r}: it is no longer the one this kernel created.")
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
    _made.pop(_key("role", name), None)
    return True


# ----------------------------------------------------------------------------- scratch schemas
def lab_schema(engine: Engine, name: str) -> str:
    """Create (if missing) this kernel's scratch schema ``wb_<name>_<kernel>``; returns its name.

    Chapters that create tables of their own put them here, so they never touch the seeded
    data, two kernels never share one (the suffix is ``scratch_suffix()``), and
    ``drop_lab_schema(engine, schema)`` (at the end of the notebook) or ``reset`` (a kernel that is
    gone) can drop them without touching anything else. The schema is stamped and its OID recorded
    in the marker (``ownership``); an existing schema of that name the workbook cannot prove it
    created is refused, never taken over.
    """
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


# ----------------------------------------------------------------------------- leftovers of kernels that are gone
def _dead(name: str) -> bool:
    return owner_alive(name) is False


def _proven_schemas(url) -> set[str]:
    """Scratch schemas the workbook's marker proves it created (OID recorded, stamp matching)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as conn:
            return set(ownership(conn).schemas.values())
    finally:
        eng.dispose()


def drop_leftovers(url=None, progress: bool = False) -> dict[str, list[str]]:
    """Drop the scratch objects of kernels that are gone; keep (and list) those of live kernels.

    In the workbook database: scratch schemas the marker proves the workbook created, whose suffix names a dead process of this
    machine, and unsuffixed ``wb_*`` ones (made before names were per kernel). On the server: databases
    ``<db>_..._k<pid>_...`` stamped as clones, and roles stamped ``qo-workbook role``, of dead processes.
    ``url``: the workbook database (default: ``database_url()``).
    """
    base = url if url is not None else database_url()
    out: dict[str, list[str]] = {"schemas": [], "databases": [], "roles": [], "kept": []}
    with psycopg.connect(**libpq_kwargs(base), autocommit=True) as conn:
        conn.execute("SELECT set_config('lock_timeout', '10s', false)")
        for name in sorted(_proven_schemas(base)):
            legacy = _SUFFIX_RE.search(name) is None
            if legacy or _dead(name):
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))  # name from the catalog
                out["schemas"].append(name)
            elif not made_here("schema", name, base.database):
                out["kept"].append(f"schema {name}")
        like = base.database.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "\\_%"
        for (name,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s AND shobj_description(oid, 'pg_database') = %s "
            "ORDER BY 1",
            (like, CLONE_COMMENT),
        ).fetchall():
            if _SUFFIX_RE.search(name) is None:
                continue  # <db>_tpl, and clones made before names were per kernel
            if _dead(name):
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                out["databases"].append(name)
            elif database_record(name) is None:
                out["kept"].append(f"database {name}")
        for (name,) in conn.execute(
            "SELECT rolname FROM pg_roles r WHERE shobj_description(oid, 'pg_authid') = %s AND NOT EXISTS "
            "(SELECT 1 FROM pg_stat_activity a WHERE a.usename = r.rolname) ORDER BY 1",
            (ROLE_COMMENT,),
        ).fetchall():
            if _dead(name):
                try:
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
                    out["roles"].append(name)
                except psycopg.Error as exc:  # it owns objects somewhere: say so, keep it
                    out["kept"].append(f"role {name} ({str(exc).splitlines()[0]})")
    if progress:
        dropped = [f"{k[:-1]} {n}" for k in ("schemas", "databases", "roles") for n in out[k]]
        if dropped:
            print("removed leftovers of kernels that are gone: " + ", ".join(dropped), file=sys.stderr)
        if out["kept"]:
            print(
                "kept, as their kernels are running (or on another machine): " + ", ".join(out["kept"]),
                file=sys.stderr,
            )
    return out


# ----------------------------------------------------------------------------- the safety net at exit
@atexit.register
def _drop_at_exit() -> None:
    """Best effort, bounded: drop what this process still has in its registry (never anything else)."""
    mine = [m for m in _made.values() if m.pid == os.getpid()]
    if not mine:
        return
    try:
        base = database_url()
    except Exception:  # noqa: BLE001 - at exit: nothing to report to
        return
    for m in sorted(mine, key=lambda m: ("schema", "database", "role").index(m.kind)):
        try:
            db = m.database if m.kind == "schema" else "postgres"
            kw = dict(libpq_kwargs(base.set(database=db)), connect_timeout=3)
            with psycopg.connect(**kw, autocommit=True) as conn:
                conn.execute(
                    "SELECT set_config('lock_timeout', '3s', false), set_config('statement_timeout', '20s', false)"
                )
                if m.kind == "schema":
                    row = conn.execute(
                        "SELECT oid, obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
                        (m.name,),
                    ).fetchone()
                    if row and int(row[0]) == m.oid and row[1] == m.stamp:
                        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(m.name)))
                elif m.kind == "database":
                    row = conn.execute(
                        "SELECT oid, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                        (m.name,),
                    ).fetchone()
                    if row and int(row[0]) == m.oid and row[1] == m.stamp:
                        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(m.name)))
                else:
                    drop_role(conn, m.name)
        except Exception:  # noqa: BLE001 - the server may be gone; reset removes what is left
            pass
        _made.pop(_key(m.kind, m.name, m.database), None)
