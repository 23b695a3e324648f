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

from helpers import postmaster
from helpers.capability import missing
from helpers.processes import proc_stat


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
    # the stopped server's closed connections may leave the port in TIME_WAIT for a minute; SO_REUSEADDR
    # binds through that (it never lets two listeners share a port, which is what this test needs)
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    from helpers.database import database_url, libpq_kwargs, masked

    good = database_url()
    probe = libpq_kwargs(good.set(password="wrong-password"))
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


# A parent that never reaps its children (Jupyter, `make lab` as a container's PID 1): it becomes the
# children's subreaper, so the daemonised postmaster (pg_ctl's grandchild) is re-parented to it, and
# after `kill -9` stays a zombie for as long as this parent lives. PostgreSQL's `kill(pid, 0)` still
# sees that pid, so without recovery it refuses to start ("lock file ... already exists").
NON_REAPING_PARENT = r"""
import ctypes, json, os, signal, subprocess, sys, time
import psycopg
from sqlalchemy.engine import make_url

PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def helpers(*args):
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, timeout=120)


def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1])  # state letter, parent pid


out = {"first": helpers("db", "start").returncode}
pid = json.loads(helpers("db", "status").stdout)["pid"]
out["postmaster_parent_is_us"] = state(pid)[1] == os.getpid()
url = make_url(helpers("db", "url").stdout.strip())
conn = psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                       dbname=url.database, connect_timeout=5, autocommit=True)
conn.execute("SET statement_timeout = '60s'")
backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
# a busy backend does not notice its postmaster's death: an orphan still attached to the old server
conn.pgconn.send_query(b"DO $$BEGIN LOOP PERFORM 1; END LOOP; END$$")
time.sleep(0.3)
os.kill(pid, signal.SIGKILL)
deadline = time.monotonic() + 10
while state(pid)[0] != "Z" and time.monotonic() < deadline:
    time.sleep(0.05)
out["zombie"] = state(pid)[0] == "Z"
out["orphan_alive_before"] = (state(backend) or ("gone",))[0] not in ("Z", "gone")
second = helpers("db", "start")
out["second"] = second.returncode
out["stderr"] = second.stderr
out["still_zombie"] = state(pid)[0] == "Z"
out["orphan_after"] = (state(backend) or ("gone",))[0]
out["new_pid"] = json.loads(helpers("db", "status").stdout)["pid"]
out["stop"] = helpers("db", "stop").stdout.strip()
while True:  # now reap everything we inherited
    try:
        if os.waitpid(-1, 0)[0] == 0:
            break
    except ChildProcessError:
        break
print(json.dumps(out))
"""


def test_recovers_from_kill_9_under_a_parent_that_never_reaps(state_dir):
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "WORKBOOK_DB", "WORKBOOK_PORT"}}
    env["WORKBOOK_STATE"] = str(state_dir)
    res = subprocess.run(
        [sys.executable, "-c", NON_REAPING_PARENT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["first"] == 0 and out["postmaster_parent_is_us"], out
    assert out["zombie"] and out["still_zombie"], "the test must start from an unreaped zombie postmaster"
    assert out["orphan_alive_before"], "the busy backend should outlive its postmaster"
    assert out["second"] == 0, out["stderr"]
    assert out["orphan_after"] in ("Z", "gone"), "the orphaned backend must be killed"
    assert out["new_pid"] and out["stop"] == "stopped"


def test_a_lock_is_removed_only_when_its_writer_is_gone(tmp_path):
    """The lock-file rule on its own: a lock naming a live process started when the lock says is kept
    (here: this test's own process stands in for a running postmaster); one whose pid now belongs to a
    process started at another time (pid reuse after a restart), or to no process, is stale."""
    from helpers import server

    p = server.Paths(
        state=tmp_path,
        data=tmp_path / "data",
        socket_dir=tmp_path / "run",
        log=tmp_path / "log",
        port_file=tmp_path / "port",
        password_file=tmp_path / "password",
        lock_file=tmp_path / "lock",
    )
    p.data.mkdir()
    p.socket_dir.mkdir()
    me = os.getpid()
    started = int(proc_stat(me)[2])
    gone = max(int(x) for x in os.listdir("/proc") if x.isdigit()) + 100_000  # no such pid (pid_max 4M)

    def lock(port: int, pid: int, start: int, data=p.data):
        path = p.socket_dir / f".s.PGSQL.{port}.lock"
        path.write_text(f"{pid}\n{data}\n{start}\n{port}\n{p.socket_dir}\n")
        (p.socket_dir / f".s.PGSQL.{port}").touch()
        return path

    live = lock(5001, me, started)
    reused = lock(5002, 1, started)  # pid 1 runs, but was not started when this lock says
    dead = lock(5003, gone, started)
    foreign = lock(5004, gone, started, data=tmp_path / "someone-else")
    postmaster.recover_from_crash(p.data, p.socket_dir)
    assert live.exists() and (p.socket_dir / ".s.PGSQL.5001").exists(), "a live writer's lock must stay"
    assert not reused.exists() and not dead.exists() and not (p.socket_dir / ".s.PGSQL.5003").exists()
    assert foreign.exists(), "a lock of another data folder is not ours to remove"

    (p.data / "postmaster.pid").write_text(f"{me}\n{p.data}\n{started}\n5001\n")
    with pytest.raises(server.WorkbookError, match=f"pid {me}"):
        postmaster.recover_from_crash(p.data, p.socket_dir)
    assert (p.data / "postmaster.pid").exists()
