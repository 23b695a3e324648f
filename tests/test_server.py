"""The embedded server's lifecycle, on servers of the tests' own (never the shared one)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import psycopg
import pytest
from conftest import run_helpers

from helpers.capability import missing


def _status(env) -> dict:
    res = run_helpers("db", "status", env=env)
    return json.loads(res.stdout)


def _connect(env, dbname="workbook"):
    url = run_helpers("db", "url", env=env).stdout.strip()
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=dbname, connect_timeout=5
    )


def test_start_is_idempotent_and_stop(state_dir):
    env = {"WORKBOOK_STATE": str(state_dir)}
    t0 = time.perf_counter()
    first = run_helpers("db", "start", env=env)
    cold = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr
    s1 = _status(env)
    assert s1["running"] and s1["port"]
    again = run_helpers("db", "start", env=env)
    assert again.returncode == 0, again.stderr
    s2 = _status(env)
    assert s2["pid"] == s1["pid"], "a second start must reuse the running server"
    with _connect(env) as conn:
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        assert "pg_stat_statements" in preload and "auto_explain" in preload
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
    assert os.path.exists(os.path.join(s1["socket_dir"], f".s.PGSQL.{s1['port']}")), "unix socket missing"
    assert run_helpers("db", "stop", env=env).stdout.strip() == "stopped"
    assert run_helpers("db", "status", env=env).returncode == 3
    assert run_helpers("db", "stop", env=env).stdout.strip() == "not running"
    print(f"cold start {cold:.2f}s")


def test_recovers_from_kill_9(state_dir):
    env = {"WORKBOOK_STATE": str(state_dir)}
    assert run_helpers("db", "start", env=env).returncode == 0
    with _connect(env) as conn:
        conn.execute("CREATE TABLE survivor (x int)")
        conn.execute("INSERT INTO survivor VALUES (7)")
        conn.commit()
    pid = _status(env)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    assert not _status(env)["running"]
    res = run_helpers("db", "start", env=env)
    assert res.returncode == 0, res.stderr
    s = _status(env)
    assert s["running"] and s["pid"] != pid
    with _connect(env) as conn:
        assert conn.execute("SELECT x FROM survivor").fetchone() == (7,)


def test_taken_port_is_avoided_or_reported(state_dir):
    env = {"WORKBOOK_STATE": str(state_dir)}
    assert run_helpers("db", "start", env=env).returncode == 0
    port = _status(env)["port"]
    assert run_helpers("db", "stop", env=env).returncode == 0
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        # the recorded port is taken by someone else: a new free port is chosen and recorded
        res = run_helpers("db", "start", env=env)
        assert res.returncode == 0, res.stderr
        assert _status(env)["port"] != port
        assert run_helpers("db", "stop", env=env).returncode == 0
        # a port the user asked for is taken: a one-paragraph error, no traceback
        res = run_helpers("db", "start", env={**env, "WORKBOOK_PORT": str(port)})
        assert res.returncode == 2
        assert f"WORKBOOK_PORT={port} is already in use" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    finally:
        blocker.close()


def test_database_url_override_starts_nothing(engine, state_dir):
    from helpers.database import database_url

    url = database_url().render_as_string(hide_password=False)
    env = {"WORKBOOK_STATE": str(state_dir), "DATABASE_URL": url}
    res = run_helpers("db", "url", env=env)
    assert res.returncode == 0 and res.stdout.strip() == url
    res = run_helpers("db", "start", env=env)
    assert "DATABASE_URL is set" in res.stderr
    assert not any(state_dir.iterdir()), "nothing may be started or created when DATABASE_URL is set"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql+psycopg://someone:secret@127.0.0.1:1/workbook", "nothing answers there"),
        ("mysql://someone:secret@127.0.0.1/workbook", "needs PostgreSQL through psycopg 3"),
        ("not a url at all", "not a URL SQLAlchemy can read"),
    ],
)
def test_bad_database_url_gets_one_paragraph(url, expected):
    res = run_helpers("db", "status", env={"DATABASE_URL": url})
    assert res.returncode == 2
    assert expected in res.stderr
    assert "Traceback" not in res.stderr
    assert "secret" not in res.stderr, "the password must be masked"


def test_wrong_password_and_missing_database(engine):
    from helpers.database import _libpq_kwargs, database_url, masked

    good = database_url()
    probe = _libpq_kwargs(good.set(password="wrong-password"))
    try:
        psycopg.connect(**probe).close()
        pytest.skip(f"{masked(good)} accepts any password from here (trust in its pg_hba.conf): nothing to refuse")
    except psycopg.OperationalError:
        pass
    bad_pw = good.set(password="wrong-password").render_as_string(hide_password=False)
    res = run_helpers("db", "status", env={"DATABASE_URL": bad_pw})
    assert res.returncode == 2 and "password is wrong" in res.stderr and "wrong-password" not in res.stderr
    no_db = good.render_as_string(hide_password=False)
    res = run_helpers("db", "status", env={"DATABASE_URL": no_db, "WORKBOOK_DB": "no_such_db_here"})
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_missing_extension_is_explained(engine):
    from helpers import WorkbookError
    from helpers.database import require_extension

    if missing("pg_stat_statements") and "shared_preload_libraries" in missing("pg_stat_statements"):
        with pytest.raises(WorkbookError, match="shared_preload_libraries"):  # a stock server: said how to load it
            require_extension(engine, "pg_stat_statements")
    else:
        require_extension(engine, "pg_stat_statements")
    with pytest.raises(WorkbookError, match="not available on this server"):
        require_extension(engine, "no_such_extension")
