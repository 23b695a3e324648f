"""Databases of a chapter's own: clones of the seeded data, dropped only when the workbook made them."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

from helpers import WorkbookError, clone_database, database_name, drop_database
from helpers.database import database_url, libpq_kwargs


def test_clone_is_a_private_copy(engine):
    clone = clone_database("t_clone")
    try:
        with clone.begin() as c:
            assert c.execute(text("SELECT current_database()")).scalar() == database_name("t_clone")
            n = c.execute(text("SELECT count(*) FROM posts")).scalar()
            c.execute(text("DELETE FROM comments"))
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM posts")).scalar() == n
            assert c.execute(text("SELECT count(*) FROM comments")).scalar() > 0, "the shared data must be untouched"
    finally:
        clone.dispose()
        assert drop_database("t_clone") is True
    assert drop_database("t_clone") is False


def test_drop_database_refuses_what_the_workbook_did_not_create(engine):
    base = database_url()
    name = database_name("t_foreign")  # the name this kernel would use, taken by someone else
    admin = libpq_kwargs(base.set(database="postgres"))
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pytest.raises(WorkbookError, match="was not created by the workbook"):
            drop_database("t_foreign")
        with pytest.raises(WorkbookError, match="was not created by the workbook"):
            clone_database("t_foreign")
        with psycopg.connect(**admin, autocommit=True) as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.embedded
def test_where_shows_the_servers_changed_settings_and_the_readme_lists_each(engine):
    from pathlib import Path

    from helpers import where

    changed = where()["settings"]
    assert changed["shared_buffers"] == "256MB" and changed["work_mem"] == "16MB"  # chapters 02a, 02b rely on them
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    unlisted = [name for name in changed if f"`{name.lower()} = " not in readme.lower()]
    assert not unlisted, f"where() shows settings the README does not list: {unlisted}"


# ----------------------------------------------------------------------------- a connect behind a copy
def _held_back_database(admin_kw: dict, name: str):
    """A fresh database and a transaction holding it against new connections, as a copy of it does
    (``ALTER DATABASE ... RENAME`` takes the same kind of lock and keeps it until rollback)."""
    with psycopg.connect(**admin_kw, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    holder = psycopg.connect(**admin_kw)
    holder.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(name + "_x")))
    return holder


def _waiting_to_connect(admin_kw: dict, name: str) -> int:
    """Backends waiting in their startup for the lock on database ``name`` (each connect attempt leaves one)."""
    with psycopg.connect(**admin_kw, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.objid WHERE l.locktype = 'object' "
            "AND l.classid = 'pg_database'::regclass AND NOT l.granted AND d.datname = %s",
            (name,),
        ).fetchone()[0]


def _drop(admin_kw: dict, name: str) -> None:
    with psycopg.connect(**admin_kw, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_connect_held_back_by_a_lock_on_its_database_waits_for_it_then_connects(engine):
    """A second kernel connecting while the first copies the database is not told the server is dead."""
    import threading
    import time

    from helpers import scratch_suffix
    from helpers.database import check_connection

    base = database_url()
    admin_kw = libpq_kwargs(base.set(database="postgres"))
    name = f"t_held_{scratch_suffix()}"
    holder = _held_back_database(admin_kw, name)
    released = []

    def release_once_a_second_connect_waits():  # asked of the server, never decided by a sleep
        # the first connect times out (2 s below) and its backend stays queued; a second waiting backend is
        # check_connection connecting again behind the lock: the path this test is about
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _waiting_to_connect(admin_kw, name) < 2:
            time.sleep(0.05)  # a poll, bounded by the deadline
        released.append(_waiting_to_connect(admin_kw, name))
        holder.rollback()

    t = threading.Thread(target=release_once_a_second_connect_waits)
    t.start()
    try:
        check_connection(base.set(database=name).update_query_dict({"connect_timeout": "2"}))
        assert released and released[0] >= 2, f"no second connect waited behind the lock: {released}"
    finally:
        t.join()
        holder.close()
        _drop(admin_kw, name)


def test_a_connect_held_back_too_long_names_the_session_that_holds_it(engine, monkeypatch):
    from helpers import database, scratch_suffix

    base = database_url()
    admin_kw = libpq_kwargs(base.set(database="postgres"))
    name = f"t_held_{scratch_suffix()}"
    holder = _held_back_database(admin_kw, name)
    monkeypatch.setattr(database, "DATABASE_LOCK_WAIT", 3)
    try:
        with pytest.raises(WorkbookError) as err:
            database.check_connection(base.set(database=name).update_query_dict({"connect_timeout": "2"}))
        msg = str(err.value)
        assert f"session {holder.info.backend_pid} holds a lock" in msg and "ALTER DATABASE" in msg, msg
        assert "did not answer as a PostgreSQL server" not in msg
    finally:
        holder.rollback()
        holder.close()
        _drop(admin_kw, name)


def test_a_big_clone_says_what_it_copies_and_how_long_it_took(engine, monkeypatch, capsys):
    from helpers import scratchdb
    from helpers.progressbar import HEADLESS_ENV

    monkeypatch.setattr(scratchdb, "SAY_FROM_BYTES", 0)  # every database is "big" here
    monkeypatch.setenv(HEADLESS_ENV, "1")
    clone = clone_database("t_said")
    try:
        out = capsys.readouterr().out
        assert f"copying the seeded data into {database_name('t_said')}: " in out and " s\n" in out, out
        assert "..." not in out, "a headless run prints only the line when done"
    finally:
        clone.dispose()
        assert drop_database("t_said") is True
