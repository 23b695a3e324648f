"""Nothing lost, nothing stuck: the workbook drops only what it can prove it created, and every
wait of its DDL is bounded and names its blocker (issue 13, items 1 and 5, and Ctrl-C of a seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from conftest import REPO, run_helpers
from psycopg import sql
from sqlalchemy import text

from helpers import drop_lab_schema, lab_schema, make_engine, scratch_name, seed
from helpers.config import WorkbookError
from helpers.database import database_url, libpq_kwargs
from helpers.models import TABLES
from helpers.waits import LockWaitTimeout


def _connect(db: str, app: str = "qowb-test", autocommit: bool = True) -> psycopg.Connection:
    kwargs = libpq_kwargs(database_url().set(database=db))
    kwargs["application_name"] = app
    return psycopg.connect(**kwargs, autocommit=autocommit)


def _tables(db: str) -> set[str]:
    with _connect(db) as conn:
        rows = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"
        )
        return {r[0] for r in rows}


def _same_server() -> dict:
    """Environment that points a subprocess at the server these tests use (``run_helpers`` drops
    DATABASE_URL so that tests get the embedded server; under DATABASE_URL, keep it)."""
    url = os.environ.get("DATABASE_URL")
    return {"DATABASE_URL": url} if url else {}


def _assert_short(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 8, res.stderr


# ----------------------------------------------------------------------------- item 1: ownership by proof
@pytest.mark.parametrize("command", ["seed", "reset"])
def test_a_users_table_of_your_own_is_refused_and_kept(scratch_db, command):
    """The issue's repro: a database holding the user's own `users` with one row."""
    db = scratch_db(f"own_repro_{command}")
    with _connect(db) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, precious text)")
        conn.execute("INSERT INTO users VALUES (1, 'irreplaceable')")
    res = run_helpers(command, "--scale", "ci", env={**_same_server(), "WORKBOOK_DB": db})
    assert res.returncode != 0, res.stdout + res.stderr
    assert "public.users" in res.stderr and "Nothing was changed" in res.stderr, res.stderr
    _assert_short(res)
    with _connect(db) as conn:
        assert conn.execute("SELECT id, precious FROM users").fetchall() == [(1, "irreplaceable")]
    assert _tables(db) == {"users"}, "nothing may be created either"


@pytest.mark.parametrize("name", TABLES)
def test_a_foreign_table_of_every_model_name_is_refused_even_with_force(scratch_db, name):
    db = scratch_db("own_each")
    with _connect(db) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int, mine text)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (7, 'mine')").format(sql.Identifier(name)))
    eng = make_engine(database=db)
    try:
        with pytest.raises(WorkbookError, match=f"public\\.{name}\\b"):
            seed.seed(eng, "ci")
        with pytest.raises(WorkbookError, match="--force seeds beside foreign tables, but never drops one"):
            seed.seed(eng, "ci", force=True)
    finally:
        eng.dispose()
    with _connect(db) as conn:
        assert conn.execute(sql.SQL("SELECT id, mine FROM {}").format(sql.Identifier(name))).fetchall() == [(7, "mine")]
    assert _tables(db) == {name}


def test_force_with_a_foreign_users_keeps_it_and_says_why(scratch_db):
    db = scratch_db("own_force")
    with _connect(db) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, precious text)")
        conn.execute("INSERT INTO users VALUES (1, 'irreplaceable')")
    res = run_helpers("seed", "--scale", "ci", "--force", env={**_same_server(), "WORKBOOK_DB": db})
    assert res.returncode != 0, res.stdout + res.stderr
    assert "public.users" in res.stderr and "never drops one" in res.stderr, res.stderr
    _assert_short(res)
    with _connect(db) as conn:
        assert conn.execute("SELECT id, precious FROM users").fetchall() == [(1, "irreplaceable")]
    assert _tables(db) == {"users"}


def test_a_seeded_database_reseeds_and_resets_and_keeps_its_scratch_schemas(scratch_db):
    db = scratch_db("own_reseed")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        schema = lab_schema(eng, "owntest")
        with eng.begin() as c:
            c.execute(text(f"CREATE TABLE {schema}.t (x int)"))
        first = seed.seeded_info(eng)["marker_id"]
        seed.seed(eng, "ci")  # the seed keeps the scratch schemas (and their proof)
        assert seed.seeded_info(eng)["marker_id"] == first
        assert lab_schema(eng, "owntest") == schema
        with eng.connect() as c:
            own = seed.ownership(c)
            assert own.foreign == [] and schema in own.schemas.values()
            assert sorted(own.tables.values()) == sorted([*TABLES, seed.MARKER_TABLE])
        seed.reset(eng)  # a live kernel's (this process's) scratch schema stays, still proven
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regnamespace(:s)"), {"s": schema}).scalar() == schema
            own = seed.ownership(c)
            assert own.foreign == [] and schema in own.schemas.values()
        assert seed.is_seeded(eng, "ci", 42)
        assert drop_lab_schema(eng, schema) is True
    finally:
        eng.dispose()


def test_the_stamps_are_invisible_to_autogenerate(scratch_db):
    """Alembic compares table comments with the models: the stamp is on the row type instead."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from helpers.models import Base

    eng = make_engine(database=scratch_db("own_autogen"))
    try:
        seed.seed(eng, "ci")
        with eng.connect() as c:
            opts = {"include_object": lambda o, n, t, r, x: not (t == "table" and n == seed.MARKER_TABLE)}
            assert compare_metadata(MigrationContext.configure(c, opts=opts), Base.metadata) == []
    finally:
        eng.dispose()


def test_an_existing_schema_of_a_scratch_name_is_not_taken_over(scratch_db):
    db = scratch_db("own_schema")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        taken = scratch_name("wb_theirs")  # the very name lab_schema(eng, "theirs") would make here
        with eng.begin() as c:
            c.execute(text("CREATE SCHEMA wb_theirs"))
            c.execute(text("COMMENT ON SCHEMA wb_theirs IS 'qo-workbook'"))  # a comment is no proof
            c.execute(text("CREATE TABLE wb_theirs.keep (x int)"))
            c.connection.driver_connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(taken)))
        with pytest.raises(WorkbookError, match=f"{taken} exists but the workbook did not create it"):
            lab_schema(eng, "theirs")
        with pytest.raises(WorkbookError, match="wb_theirs.keep"):
            seed.reset(eng)
        seed.reset(eng, force=True)
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regclass('wb_theirs.keep')")).scalar() == "wb_theirs.keep"
    finally:
        eng.dispose()


def test_drop_lab_schema_drops_only_a_proven_scratch_schema(scratch_db):
    db = scratch_db("own_drop_schema")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        schema = lab_schema(eng, "gone")
        with eng.begin() as c:
            c.execute(text(f"CREATE TABLE {schema}.t (x int)"))
            c.execute(text("CREATE SCHEMA wb_kept"))
        assert drop_lab_schema(eng, schema) is True
        assert drop_lab_schema(eng, schema) is False
        with pytest.raises(WorkbookError, match="did not create it"):
            drop_lab_schema(eng, "wb_kept")
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regnamespace('wb_kept')")).scalar() == "wb_kept"
            assert c.execute(text("SELECT to_regnamespace(:s)"), {"s": schema}).scalar() is None
        assert f"schema:{schema}" not in seed.seeded_info(eng) and seed.is_seeded(eng, "ci", 42)
    finally:
        eng.dispose()


def _make_legacy(eng) -> None:
    """Turn a seeded database into what the code before stamps left: a marker commented
    'qo-workbook' holding owner, scale, seed, schema_version, complete (and seeded_at), the model
    tables unstamped, and scratch schemas commented 'qo-workbook'."""
    with eng.begin() as c:
        c.execute(text("DELETE FROM workbook_meta WHERE key = 'marker_id' OR key LIKE '%:%'"))
        c.execute(text("COMMENT ON TABLE workbook_meta IS 'qo-workbook'"))
        c.execute(text("COMMENT ON TYPE workbook_meta IS NULL"))
        for name in TABLES:
            c.exec_driver_sql(f"COMMENT ON TYPE {name} IS NULL")  # names from helpers.models
        c.execute(text("DROP SCHEMA IF EXISTS wb_legacy CASCADE"))
        c.execute(text("CREATE SCHEMA wb_legacy"))
        c.execute(text("COMMENT ON SCHEMA wb_legacy IS 'qo-workbook'"))
        c.execute(text("CREATE TABLE wb_legacy.t (x int)"))


def test_a_database_seeded_before_stamps_is_stamped_once(scratch_db):
    db = scratch_db("own_legacy")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        _make_legacy(eng)
        with eng.connect() as c:
            own = seed.ownership(c)
        assert own.legacy and own.foreign == [] and "wb_legacy" in own.schemas.values()
        assert seed.ensure_seeded(eng, "ci") is False  # already seeded: only stamped
        info = seed.seeded_info(eng)
        assert info.get("marker_id") and {f"table:{n}" for n in TABLES} <= set(info) and "schema:wb_legacy" in info
        with eng.connect() as c:
            own = seed.ownership(c)
            comment = c.execute(text("SELECT obj_description('users'::regtype, 'pg_type')")).scalar()
        assert not own.legacy and own.marker_id == info["marker_id"] and own.foreign == []
        assert comment == f"qo-workbook {info['marker_id']}"
        seed.reset(eng)  # proven now: the reset drops the old scratch schema
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regnamespace('wb_legacy')")).scalar() is None
        # the seed adopts too (without ensure_seeded first)
        _make_legacy(eng)
        seed.seed(eng, "ci")
        assert seed.is_seeded(eng, "ci", 42) and seed.seeded_info(eng).get("marker_id")
    finally:
        eng.dispose()


def test_an_old_marker_beside_a_users_table_of_your_own_is_not_adopted(scratch_db):
    db = scratch_db("own_legacy_users")
    with _connect(db) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, precious text)")
        conn.execute("INSERT INTO users VALUES (1, 'irreplaceable')")
        conn.execute("CREATE TABLE workbook_meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute("COMMENT ON TABLE workbook_meta IS 'qo-workbook'")
        conn.execute(
            "INSERT INTO workbook_meta VALUES ('owner', 'qo-workbook'), ('scale', 'ci'), ('seed', '42'), "
            "('schema_version', 'x'), ('complete', 'false')"
        )
    res = run_helpers("seed", "--scale", "ci", env={**_same_server(), "WORKBOOK_DB": db})
    assert res.returncode != 0
    assert "public.users" in res.stderr and "older workbook's marker" in res.stderr and "precious" in res.stderr
    _assert_short(res)
    res = run_helpers("seed", "--scale", "ci", "--force", env={**_same_server(), "WORKBOOK_DB": db})
    assert res.returncode != 0 and "never drops one" in res.stderr
    with _connect(db) as conn:
        assert conn.execute("SELECT id, precious FROM users").fetchall() == [(1, "irreplaceable")]
        assert conn.execute("SELECT count(*) FROM workbook_meta").fetchone()[0] == 5
    assert _tables(db) == {"users", "workbook_meta"}


def test_a_view_of_yours_on_a_workbook_table_stops_the_drop(scratch_db):
    """The workbook's tables are dropped without CASCADE: a foreign view on one is not dropped with it."""
    db = scratch_db("own_view")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        with eng.begin() as c:
            c.execute(text("CREATE VIEW my_tags AS SELECT name FROM tags"))
        with pytest.raises(WorkbookError, match="depend on them"):
            seed.seed(eng, "ci", force=True)
        with eng.connect() as c:
            assert c.execute(text("SELECT count(*) FROM my_tags")).scalar() == 60
            assert seed.is_seeded(eng, "ci", 42), "nothing changed"
    finally:
        eng.dispose()


# ----------------------------------------------------------------------------- item 5: bounded waits
@pytest.mark.parametrize("command", ["seed", "reset"])
def test_a_session_reading_users_stops_the_seed_within_the_limit_and_is_named(scratch_db, command):
    db = scratch_db(f"own_wait_{command}")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        before = seed.seeded_info(eng)
    finally:
        eng.dispose()
    with _connect(db, app="precious psql", autocommit=False) as holder:
        holder.execute("SELECT count(*) FROM users")  # BEGIN; ACCESS SHARE on users, held open
        pid = holder.info.backend_pid
        t0 = time.perf_counter()
        res = run_helpers(
            command,
            "--scale",
            "ci",
            env={**_same_server(), "WORKBOOK_DB": db, "WORKBOOK_LOCK_TIMEOUT": "1s"},
            timeout=60,
        )
        elapsed = time.perf_counter() - t0
        holder.rollback()
    assert res.returncode != 0, res.stdout + res.stderr
    assert f"pid {pid}" in res.stderr and "'precious psql'" in res.stderr, res.stderr
    assert "idle in transaction" in res.stderr and f"SELECT pg_terminate_backend({pid});" in res.stderr
    _assert_short(res)
    assert elapsed < 20, f"{elapsed:.1f} s: a 1 s lock_timeout plus starting Python"
    eng = make_engine(database=db)
    try:
        assert seed.seeded_info(eng) == before, "nothing changed"
        assert seed.is_seeded(eng, "ci", 42)
    finally:
        eng.dispose()


def test_bounded_names_the_blocker_and_rolls_back(scratch_db):
    from helpers import bounded

    db = scratch_db("own_bounded")
    eng = make_engine(database=db)
    try:
        with eng.begin() as c:
            c.execute(text("CREATE TABLE t (x int)"))
        with _connect(db, app="holder", autocommit=False) as holder:
            holder.execute("SELECT * FROM t")
            pid = holder.info.backend_pid
            t0 = time.perf_counter()
            with pytest.raises(LockWaitTimeout) as err:
                with eng.begin() as c, bounded(c, "Dropping t", lock_timeout="500ms"):
                    c.execute(text("CREATE TABLE u (x int)"))
                    c.execute(text("DROP TABLE t"))
            elapsed = time.perf_counter() - t0
            holder.rollback()
        assert [b.pid for b in err.value.blockers] == [pid]
        assert err.value.blockers[0].application_name == "holder"
        assert str(err.value).startswith("Dropping t waited 500ms for a lock")
        assert elapsed < 5
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regclass('u')")).scalar() is None, "rolled back"
            assert c.execute(text("SHOW lock_timeout")).scalar() == "0", "transaction-local"
    finally:
        eng.dispose()


@pytest.mark.parametrize("kind", ["orm_session", "psycopg", "psycopg_autocommit"])
def test_bounded_takes_a_session_or_a_psycopg_connection(scratch_db, kind):
    from sqlalchemy.orm import Session

    from helpers import bounded

    db = scratch_db("own_bounded_kinds")
    eng = make_engine(database=db)
    try:
        with eng.begin() as c:
            c.execute(text("CREATE TABLE t (x int)"))
        with _connect(db, app="holder", autocommit=False) as holder:
            holder.execute("SELECT * FROM t")
            pid = holder.info.backend_pid
            with pytest.raises(LockWaitTimeout) as err:
                if kind == "orm_session":
                    with Session(eng) as s, s.begin(), bounded(s, "Dropping t", lock_timeout="300ms"):
                        s.execute(text("DROP TABLE t"))
                else:
                    with _connect(db, autocommit=kind == "psycopg_autocommit") as conn:
                        with bounded(conn, "Dropping t", lock_timeout="300ms"):
                            conn.execute("DROP TABLE t")
            holder.rollback()
        assert [b.pid for b in err.value.blockers] == [pid]
    finally:
        eng.dispose()


def test_every_migration_revision_is_bounded(scratch_db):
    """env.py bounds revisions that set no limit of their own (0007's VALIDATE here)."""
    from alembic import command
    from alembic.config import Config

    from helpers.config import REPO_ROOT

    db = scratch_db("own_migrations")
    url = database_url().set(database=db)
    cfg = Config(str(REPO_ROOT / "migrations" / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["url"] = url.render_as_string(hide_password=False)
    cfg.attributes["lock_timeout"] = "1s"
    command.upgrade(cfg, "0006")
    with _connect(db, app="migration blocker", autocommit=False) as holder:
        holder.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(LockWaitTimeout, match="'migration blocker'"):
            command.upgrade(cfg, "0007")
        holder.rollback()
    with _connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0006"
    command.upgrade(cfg, "0007")


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_the_seed_exits_130_and_keeps_nothing(scratch_db):
    db = scratch_db("own_sigint")
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in {"DATABASE_URL", "WORKBOOK_PORT", "WORKBOOK_STATE"}
    }
    env.update(_same_server(), WORKBOOK_DB=db)
    proc = subprocess.Popen(
        [sys.executable, "-m", "helpers", "seed", "--scale", "small"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        loaded = 0
        while time.monotonic() < deadline and proc.poll() is None:  # until a table has been loaded
            with _connect(db) as conn:
                if conn.execute("SELECT to_regclass('public.workbook_meta')").fetchone()[0]:
                    loaded = conn.execute(
                        "SELECT count(*) FROM workbook_meta WHERE key LIKE 'table:%' AND key <> 'table:workbook_meta'"
                    ).fetchone()[0]
            if loaded:
                break
            time.sleep(0.05)
        assert loaded, "the seed never loaded a table"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted, nothing kept" in err and "Traceback" not in err, err
    assert _tables(db) == {"workbook_meta"}, "the tables it had loaded are dropped"
    eng = make_engine(database=db)
    try:
        assert seed.seeded_info(eng)["complete"] == "false"
        with eng.connect() as c:
            assert seed.ownership(c).foreign == []
        seed.seed(eng, "ci")  # and the next seed runs
        assert seed.is_seeded(eng, "ci", 42)
    finally:
        eng.dispose()
