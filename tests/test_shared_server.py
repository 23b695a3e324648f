"""A team training server: a trainee without superuser rights, in a database of their own."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from conftest import run_helpers
from psycopg import sql

from helpers.database import database_url, libpq_kwargs

ROLE = "wb_test_trainee"


@pytest.fixture
def trainee(engine):
    base = database_url()
    admin = libpq_kwargs(base.set(database="postgres"))
    db = f"{base.database}_t_trainee"
    pw = secrets.token_urlsafe(12)
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB").format(
                sql.Identifier(ROLE), sql.Literal(pw)
            )
        )
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(ROLE)))
    url = base.set(username=ROLE, password=pw, database=db).render_as_string(hide_password=False)
    yield url
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))


def test_trainee_without_superuser_can_seed_and_set_up(trainee):
    res = run_helpers("seed", "--scale", "ci", env={"DATABASE_URL": trainee})
    assert res.returncode == 0, res.stderr
    code = (
        "from helpers import setup, where; e = setup(quiet=True); w = where(); "
        "assert not w['superuser'] and w['scale'] == 'ci', w; print('ok')"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "DATABASE_URL": trainee},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
