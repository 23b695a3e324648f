"""Scratch databases of a kernel's own: a clone of the seeded data, an empty one, the schema only, some rows.

Each is ``<workbook db>_<suffix>_<kernel>`` (``helpers.scratch``: per kernel, so two learners never share
one), stamped ``CLONE_COMMENT`` and recorded as this process's, so ``drop_database(suffix)`` drops only
what this process created. Clones are copied from ``<db>_tpl``, an idle template made once per seed
under a server-wide advisory lock. Under ``helpers run`` each is also written to the run's record
(``RUN_RECORD_ENV``), so the runner drops what an interrupted notebook left.
"""

from __future__ import annotations

import json
import os
import time

import psycopg
from psycopg import sql
from sqlalchemy import Engine, NullPool, column, create_engine, func, select, table, text
from sqlalchemy.engine import URL

from . import models, seed
from .config import WorkbookError, settings
from .database import CLONE_COMMENT, _engines, database_url, libpq_kwargs, psycopg_conninfo, try_create_extension
from .scratch import database_record, forget_database, remember_database, scratch_name

TEMPLATE_SUFFIX = "tpl"
_CLONE_LOCK = 0x514F5743  # pg_advisory_lock key: one maker of the template per server


def _copy_database(admin, name: str, source: str) -> bool:
    """CREATE DATABASE name TEMPLATE source; False when sessions on source prevent the copy.

    Tried only when nobody else is connected to ``source``: the copy locks ``source`` against new
    connections while it runs, and waits up to 5 s for other sessions to leave before it fails. With
    another learner at work there, the caller builds the database another way instead of holding
    that learner's connections back (``helpers.database.check_connection`` waits out a copy in
    progress, bounded, and names it).
    """
    deadline = time.monotonic() + 1.0  # the backends of connections this process just closed are exiting
    while admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend' "
        "AND pid <> pg_backend_pid()",
        (source,),
    ).fetchone()[0]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    try:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(source)))
        return True
    except psycopg.errors.ObjectInUse:  # a session arrived in between
        pass
    except psycopg.errors.InsufficientPrivilege:
        raise WorkbookError(
            f"Cannot create the scratch database {name!r}: this role lacks CREATEDB. Ask the server's "
            "administrator for CREATEDB (ALTER ROLE ... CREATEDB) or run the chapter on the embedded server."
        ) from None
    return False


def _new_database(admin, name: str, source: str | None, *, mine: bool = True) -> bool:
    """Create ``name`` (a copy of ``source`` when possible), mark it as the workbook's; True if copied.

    ``mine``: record it as this process's (``helpers.scratch``), and in the run's record
    (``RUN_RECORD_ENV``) so ``helpers run`` drops it if the notebook does not (interrupted, failed).
    False for the shared template: it belongs to no process and outlives runs.
    """
    copied = bool(source) and _copy_database(admin, name, source)
    if not copied:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(CLONE_COMMENT)))
    if mine:  # the shared template belongs to no process
        remember_database(admin, name, CLONE_COMMENT)
        _record_created(admin, name)
    return copied


def database_name(suffix: str) -> str:
    """The name of this kernel's database for ``suffix``: ``<workbook db>_<suffix>_<scratch_suffix()>``.

    Per kernel, so two learners (or one learner's two kernels) on one server never share it.
    """
    if not suffix.replace("_", "").isalnum() or suffix.lower() != suffix or suffix == TEMPLATE_SUFFIX:
        raise ValueError(
            f"suffix must be lower-case letters, digits, underscores (not {TEMPLATE_SUFFIX!r}): {suffix!r}"
        )
    return scratch_name(f"{database_url().database}_{suffix}")


_TEMPLATE_WAIT = "10min"  # making the template seeds it afresh at worst: minutes at `large`


def _lock_template(admin) -> None:
    """Take the template maker's advisory lock, waiting at most ``_TEMPLATE_WAIT``; name the holder if not."""
    admin.execute("SELECT set_config('lock_timeout', %s, false)", (_TEMPLATE_WAIT,))
    try:
        admin.execute("SELECT pg_advisory_lock(%s)", (_CLONE_LOCK,))
    except psycopg.errors.LockNotAvailable:
        holder = admin.execute(
            "SELECT a.pid, a.application_name, a.state, a.query_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.objid = %s",
            (_CLONE_LOCK & 0xFFFFFFFF,),
        ).fetchone()
        who = (
            f"session pid {holder[0]} ({holder[1] or 'no application_name'}, {holder[2]}, since {holder[3]})"
            if holder
            else "another session"
        )
        raise WorkbookError(
            f"Waited {_TEMPLATE_WAIT} for {who}, which is making the template of the seeded database. Nothing was "
            "changed. Try again when it is done, or end that session (SELECT pg_terminate_backend(pid))."
        ) from None
    finally:
        admin.execute("SELECT set_config('lock_timeout', '0', false)")


# ----------------------------------------------------------------------------- what a run created
RUN_RECORD_ENV = "WORKBOOK_RUN_RECORD"  # set by `helpers run` for its kernels: a file of JSON lines


def _record_created(admin, name: str) -> None:
    """Append ``{"database", "oid", "pid"}`` to the run's record, when this process runs under ``helpers run``."""
    path = os.environ.get(RUN_RECORD_ENV)
    if not path:
        return
    row = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    with open(path, "a") as fh:
        fh.write(json.dumps({"database": name, "oid": int(row[0]), "pid": os.getpid()}) + "\n")


def read_run_record(path) -> list[dict]:
    """The databases a run recorded (``_record_created``); unreadable lines are skipped."""
    out = []
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("database"), str) and isinstance(item.get("oid"), int):
            out.append(item)
    return out


def drop_recorded(records: list[dict]) -> list[str]:
    """Drop the recorded databases that still exist as created: same OID, still carrying the clone marker.

    A database of that name re-created since (another OID) or not marked is someone else's: left alone.
    Returns the names dropped. Used by ``helpers run`` once the notebook's kernel is gone.
    """
    if not records:
        return []
    dropped = []
    admin_url = database_url().set(database="postgres")
    with psycopg.connect(**libpq_kwargs(admin_url), autocommit=True) as conn:
        conn.execute(
            "SELECT set_config('lock_timeout', '10s', false)"
        )  # bounded: reported on the run's line if it expires
        for item in records:
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s AND oid = %s",
                (item["database"], item["oid"]),
            ).fetchone()
            if row is None or row[0] != CLONE_COMMENT:
                continue
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(item["database"])))
            dropped.append(item["database"])
    return dropped


def _template(admin, base: URL) -> str:
    """An idle, up-to-date copy of the seeded database (``<db>_tpl``) that clones are made from.

    Nobody works in it, so ``CREATE DATABASE ... TEMPLATE`` from it never meets other sessions
    (a copy straight from the shared database fails whenever another notebook is connected).
    Re-made when the seeded data changes (scale, seed, or the generator).
    """
    name = f"{base.database}_{TEMPLATE_SUFFIX}"
    s = settings()
    exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists:
        eng = create_engine(base.set(database=name), poolclass=NullPool)
        try:
            fresh = seed.is_seeded(eng, s.scale, s.seed)
        finally:
            eng.dispose()
        if fresh:
            return name
        _drop_stamped(admin, name)
    for eng in _engines.values():  # our own pooled connections to the source would block the copy
        eng.dispose()
    if not _new_database(admin, name, base.database, mine=False):
        eng = create_engine(base.set(database=name), poolclass=NullPool)
        try:
            seed.seed(eng, force=True)  # deterministic: the same bytes as the shared database
        finally:
            eng.dispose()
    return name


SAY_FROM_BYTES = 200 * 2**20  # a copy of a database this big takes long enough (seconds) to say what runs


class _saying:
    """Around a copy of ``source``: nothing for a small one; for a big one (``small``, ``large``) a line
    before (with a frontend, where the learner waits in front of the cell) and one when done, with
    its size and time (in a headless run only that one, as ``helpers.progress`` does)."""

    def __init__(self, admin, source: str, what: str):
        self.admin, self.source, self.what = admin, source, what

    def __enter__(self):
        from .progressbar import headless

        row = self.admin.execute(
            "SELECT pg_database_size(oid), pg_size_pretty(pg_database_size(oid)) FROM pg_database WHERE datname = %s",
            (self.source,),
        ).fetchone()
        self.big = bool(row) and row[0] >= SAY_FROM_BYTES
        self.size = row[1] if row else "?"
        if self.big and not headless():
            print(f"{self.what} ({self.size}) ...", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.big and exc[0] is None:
            print(f"{self.what}: {self.size} in {time.perf_counter() - self.t0:.1f} s", flush=True)
        return False


def clone_database(suffix: str, *, engine_kw: dict | None = None) -> Engine:
    """A database of the kernel's own, ``<workbook db>_<suffix>_<kernel>``, holding a copy of the seeded data.

    Chapters that change schema or data (migrations, tests) work here, never in the shared
    database. The name ends with ``scratch_suffix()`` (see ``helpers.scratch``): two kernels never share
    it; ``engine.url.database`` tells it. Re-created on every call (only a database this process created
    is ever dropped). Copied with ``CREATE DATABASE ... TEMPLATE`` from an idle template of the seeded
    database, ``<db>_tpl``, shared and made once (see ``_template``). Needs CREATEDB on a shared server.
    """
    name = database_name(suffix)
    base = database_url()
    drop_database(suffix)
    with psycopg.connect(
        **libpq_kwargs(base.set(database="postgres")), autocommit=True, application_name="wb_clone_template"
    ) as admin:
        _lock_template(admin)  # one template maker at a time, server-wide
        try:
            with _saying(admin, base.database, f"copying the seeded data into {name}"):
                template = _template(admin, base)
                copied = _new_database(admin, name, template)
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s)", (_CLONE_LOCK,))
    engine = create_engine(base.set(database=name), **(engine_kw or {}))
    if not copied:  # someone was connected to the template after all: seed afresh
        seed.seed(engine, force=True)
    return engine


def empty_database(suffix: str, **engine_kw) -> Engine:
    """A new, EMPTY database ``<workbook db>_<suffix>_<kernel>`` of this kernel's own (re-created on each call).

    For migration tests, test runs and benchmarks; ``drop_database(suffix)`` removes it.
    """
    name = database_name(suffix)
    base = database_url()
    drop_database(suffix)
    with psycopg.connect(**libpq_kwargs(base.set(database="postgres")), autocommit=True) as admin:
        _new_database(admin, name, None)
    return create_engine(base.set(database=name), **engine_kw)


def drop_database(suffix: str) -> bool:
    """Drop this kernel's ``<workbook db>_<suffix>_<kernel>`` if (and only if) this process created it.

    False when it does not exist. A database of that name this process did not create (or whose OID or
    stamp changed since) raises WorkbookError and is left untouched.
    """
    name = database_name(suffix)
    base = database_url()
    with psycopg.connect(**libpq_kwargs(base.set(database="postgres")), autocommit=True) as conn:
        row = conn.execute(
            "SELECT oid, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if row is None:
            forget_database(name)
            return False
        made = database_record(name)
        if row[1] != CLONE_COMMENT or made is None or made.oid != int(row[0]):
            raise WorkbookError(
                f"Database {name!r} exists but was not created by the workbook in this kernel; it was left "
                "untouched. Drop or rename it yourself, or set WORKBOOK_DB to another name."
            )
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    forget_database(name)
    return True


def _drop_stamped(admin, name: str) -> None:
    """Drop the shared template ``name`` (it carries the clone stamp; nobody works in it)."""
    row = admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    if row is None:
        return
    if row[0] != CLONE_COMMENT:
        raise WorkbookError(
            f"Database {name!r} exists but was not created by the workbook; it was left untouched. "
            "Drop or rename it yourself, or set WORKBOOK_DB to another name."
        )
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


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
        for name, where in tables.items():
            ident = sql.Identifier(name)
            source = sql.SQL("(SELECT * FROM {} WHERE {})").format(ident, sql.SQL(where)) if where else ident
            with (
                src.cursor().copy(sql.SQL("COPY {} TO STDOUT (FORMAT BINARY)").format(source)) as out,
                dst.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(ident)) as inp,
            ):
                for data in out:
                    inp.write(data)
        dst.commit()
    with engine.begin() as conn:
        for name in tables:
            seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": name}).scalar()
            if seq:
                top = select(func.coalesce(func.max(column("id")), 0) + 1).select_from(table(name)).scalar_subquery()
                conn.execute(select(func.setval(seq, top, False)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    return engine
