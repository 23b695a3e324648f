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
