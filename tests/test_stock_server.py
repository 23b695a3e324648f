"""A server of your own, or a shared server without superuser: what each role may do, and clean skips.

Two trainee roles are made on the workbook's server (the embedded one, or a DATABASE_URL where the
tests are superuser), each with a database it owns: one may also create databases (CREATEDB), the
other may not. Roles and everything they own are dropped at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import psycopg
import pytest
from conftest import REPO, run_helpers
from psycopg import sql

from helpers import capabilities, where
from helpers.database import database_url, is_embedded, libpq_kwargs

KINDS = {"createdb": "CREATEDB", "owner": "NOCREATEDB"}


def _drop_role_and_its_databases(conn, role: str) -> None:
    owned = conn.execute(
        "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role,)
    ).fetchall()
    for (name,) in owned:  # created by the test for this role, or by this role itself: provably the test's
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def trainees(engine):
    """{kind: DATABASE_URL of a role of that kind, in a database it owns}."""
    if not where()["superuser"]:
        pytest.skip("creating the trainee roles needs superuser")
    base = database_url()
    admin = libpq_kwargs(base.set(database="postgres"))
    tag = secrets.token_hex(3)
    urls, roles = {}, []
    with psycopg.connect(**admin, autocommit=True) as conn:
        try:
            for kind, option in KINDS.items():
                role = f"wb_t_{kind}_{tag}"
                pw = secrets.token_urlsafe(12)
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEROLE " + option).format(
                        sql.Identifier(role), sql.Literal(pw)
                    )
                )
                roles.append(role)
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(role), sql.Identifier(role)))
                urls[kind] = base.set(username=role, password=pw, database=role).render_as_string(hide_password=False)
            yield urls
        finally:
            for role in roles:
                _drop_role_and_its_databases(conn, role)


def _python(code: str, url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBOOK_DB",)}
    env["DATABASE_URL"] = url
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _capabilities(url: str) -> dict:
    res = _python("import json; from helpers import capabilities; print(json.dumps(capabilities()))", url)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_embedded_server_has_every_capability(engine):
    if not is_embedded():
        pytest.skip("DATABASE_URL is set: this checks the embedded server")
    assert capabilities(engine) == dict.fromkeys(capabilities(engine), None)


def test_capabilities_say_what_each_trainee_lacks_and_how_to_get_it(trainees):
    for kind, url in trainees.items():
        caps = _capabilities(url)
        assert caps["superuser"] and "not a superuser" in caps["superuser"]
        assert caps["auto_explain"] and "superuser" in caps["auto_explain"]
        # the extension is not trusted: only a superuser creates it in the trainee's database
        assert "CREATE EXTENSION pg_stat_statements" in caps["pg_stat_statements"]
        assert caps["createroles"] and "CREATEROLE" in caps["createroles"]
        if kind == "createdb":
            assert caps["createdb"] is None
        else:
            assert "ALTER ROLE" in caps["createdb"] and "CREATEDB" in caps["createdb"]
        assert all(v is None or "\n" not in v for v in caps.values()), "one line each"


def test_seed_and_reset_of_another_roles_database_are_refused_in_a_few_lines(trainees):
    mine = trainees["createdb"]
    res = run_helpers("seed", "--scale", "ci", env={"DATABASE_URL": mine})
    assert res.returncode == 0, res.stderr
    counts_sql = "SELECT count(*) FROM users"
    before = _python(
        f"from helpers import get_engine; from sqlalchemy import text; "
        f"print(get_engine().connect().execute(text({counts_sql!r})).scalar())",
        mine,
    ).stdout
    from sqlalchemy.engine import make_url

    other_role = make_url(trainees["owner"])
    intruder = make_url(mine).set(username=other_role.username, password=other_role.password)
    for args in (["seed", "--scale", "ci"], ["reset", "--force"]):
        res = run_helpers(*args, env={"DATABASE_URL": intruder.render_as_string(hide_password=False)})
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 4, res.stderr
        assert "error:" in res.stderr and other_role.password not in res.stderr
    after = _python(
        f"from helpers import get_engine; from sqlalchemy import text; "
        f"print(get_engine().connect().execute(text({counts_sql!r})).scalar())",
        mine,
    ).stdout
    assert before.strip() and after == before, "the owner's data is untouched"


def _chapters(url: str, *names: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBOOK_DB",)}
    env["DATABASE_URL"] = url
    paths = [str(REPO / "notebooks" / n) for n in names]
    return subprocess.run(
        [sys.executable, str(REPO / ".ci" / "nb-skips"), *paths],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow  # runs chapters as other roles
def test_chapters_skip_cleanly_for_a_role_that_owns_only_its_database(trainees):
    res = _chapters(trainees["owner"], "00_setup_and_seed.ipynb", "08_testing_strategies.ipynb", "09_monitoring.ipynb")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("00_setup_and_seed.ipynb: skipped (pg_stat_statements)") for line in lines), lines
    assert any(line.startswith("08_testing_strategies.ipynb: skipped (createdb)") for line in lines), lines
    assert any(line.startswith("09_monitoring.ipynb: skipped (createdb)") for line in lines), lines
    assert "permission denied" not in res.stdout


@pytest.mark.slow  # runs chapter 09 as another role
def test_chapter_09_runs_without_pg_stat_statements_for_a_createdb_role(trainees):
    res = _chapters(trainees["createdb"], "09_monitoring.ipynb")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    skips = [line.split(": ", 1)[1] for line in res.stdout.splitlines() if ": skipped (" in line]
    assert [s.split(")")[0] for s in skips] == ["skipped (pg_stat_statements", "skipped (auto_explain"], skips
