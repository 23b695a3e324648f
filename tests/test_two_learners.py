"""Two learners on one database: every kernel works in scratch objects of its own (issue 13, item 4).

Scratch schemas, clone databases and roles carry a suffix unique to the process; a process drops only
what it can prove it created; ``reset`` removes the leftovers of kernels that are gone and keeps those
of live ones. The slow test runs chapters 02a and 03b (the halves with code shared across kernels) twice at once, as two trainees would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

from helpers import WorkbookError, drop_lab_schema, lab_schema, scratch_suffix
from helpers.database import database_url, libpq_kwargs
from helpers.scratch import drop_leftovers, owner_alive

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.Popen:
    """Another kernel: a Python process on the same database, talking one line at a time."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"the other process said nothing: {proc.stderr.read()[-2000:]}")
    return line


def _schema_exists(engine, name: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT to_regnamespace(:s)"), {"s": name}).scalar() is not None


def _admin() -> psycopg.Connection:
    return psycopg.connect(**libpq_kwargs(database_url().set(database="postgres")), autocommit=True)


def test_two_processes_get_different_suffixes_and_one_process_keeps_its_own():
    code = "from helpers import scratch_suffix; print(scratch_suffix()); print(scratch_suffix())"
    outs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)]
    outs.append(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True))
    (a1, a2), (b1, b2) = (o.stdout.split() for o in outs)
    assert a1 == a2 and b1 == b2, "a process keeps one suffix"
    assert len({a1, b1, scratch_suffix()}) == 3, "every process gets its own"
    assert owner_alive(f"wb_x_{scratch_suffix()}") is True
    assert owner_alive("wb_x") is None  # no suffix: nothing to judge


def test_a_forked_child_is_another_kernel():
    mine = scratch_suffix()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its suffix and leave without running atexit handlers
        os.close(r)
        os.write(w, scratch_suffix().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child != mine and child.startswith(f"k{pid}_")


def test_drop_refuses_a_schema_this_process_did_not_create(engine):
    other = _python("""
        import sys
        from helpers import lab_schema, setup
        print(lab_schema(setup(quiet=True), "twolearners"), flush=True)
        sys.stdin.readline()
    """)
    try:
        theirs = _line(other)
        mine = lab_schema(engine, "twolearners")
        assert mine != theirs and _schema_exists(engine, theirs)
        with pytest.raises(WorkbookError, match="did not create it"):
            drop_lab_schema(engine, theirs)
        assert _schema_exists(engine, theirs), "the other kernel's schema must be untouched"
        assert drop_lab_schema(engine, mine) is True and not _schema_exists(engine, mine)
        assert drop_lab_schema(engine, mine) is False  # gone already: nothing to do, nothing to refuse
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(60) == 0
        assert not _schema_exists(engine, theirs), "a process drops its own schema at a normal exit"
    finally:
        other.kill()


def test_lab_schema_never_adopts_a_schema_of_the_same_name(engine):
    name = f"wb_adopt_{scratch_suffix()}"  # what lab_schema(engine, "adopt") would create
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
        conn.execute(text(f'CREATE TABLE "{name}".keep (x int)'))
    try:
        with pytest.raises(WorkbookError, match="did not create"):
            lab_schema(engine, "adopt")
        with pytest.raises(WorkbookError, match="did not create"):
            drop_lab_schema(engine, name)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regclass(:t)"), {"t": f"{name}.keep"}).scalar() is not None
            comment = conn.execute(text("SELECT obj_description(to_regnamespace(:s), 'pg_namespace')"), {"s": name})
            assert comment.scalar() is None, "the failed lab_schema must not have stamped it (rolled back)"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))


def test_drop_refuses_a_schema_replaced_since(engine):
    mine = lab_schema(engine, "replaced")
    with engine.begin() as conn:  # someone drops it and makes another of that name (a new OID)
        conn.execute(text(f'DROP SCHEMA "{mine}"'))
        conn.execute(text(f'CREATE SCHEMA "{mine}"'))
        conn.execute(text(f"COMMENT ON SCHEMA \"{mine}\" IS 'qo-workbook'"))
    try:
        with pytest.raises(WorkbookError, match="no longer the one"):
            drop_lab_schema(engine, mine)
        assert _schema_exists(engine, mine)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{mine}"'))


def test_reset_removes_the_leftovers_of_a_killed_kernel_and_keeps_a_live_ones(engine):
    with engine.connect() as conn:
        if not conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
            pytest.skip("needs superuser (creates a role)")
    code = """
        import sys
        import psycopg
        from helpers import empty_database, lab_schema, psycopg_conninfo, setup
        from helpers.scratch import create_role
        engine = setup(quiet=True)
        schema = lab_schema(engine, "leftover")
        db = empty_database("leftover")
        db.dispose()
        with psycopg.connect(**psycopg_conninfo(), autocommit=True) as conn:
            role = create_role(conn, "wb_leftover")
        print(schema, db.url.database, role, flush=True)
        sys.stdin.readline()
    """
    dead, live = _python(code), _python(code)
    try:
        dead_objs, live_objs = _line(dead).split(), _line(live).split()
        os.kill(dead.pid, signal.SIGKILL)  # no atexit: what it made stays behind
        dead.wait(30)
        assert owner_alive(dead_objs[0]) is False and owner_alive(live_objs[0]) is True
        out = drop_leftovers(progress=True)
        assert dead_objs[0] in out["schemas"] and dead_objs[1] in out["databases"] and dead_objs[2] in out["roles"]
        assert not set(live_objs) & set(out["schemas"] + out["databases"] + out["roles"])
        with _admin() as conn:
            dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            roles = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}
        assert dead_objs[1] not in dbs and dead_objs[2] not in roles and not _schema_exists(engine, dead_objs[0])
        assert live_objs[1] in dbs and live_objs[2] in roles and _schema_exists(engine, live_objs[0])
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(60) == 0
        with _admin() as conn:  # the live one cleaned up after itself at its normal exit
            assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (live_objs[1],)).fetchone()
            assert not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (live_objs[2],)).fetchone()
        assert not _schema_exists(engine, live_objs[0])
    finally:
        dead.kill()
        live.kill()


def test_leftovers_without_the_stamp_are_never_dropped(engine):
    """A name that looks like a dead kernel's is no proof: without the workbook's stamp it stays."""
    with engine.connect() as conn:
        if not conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
            pytest.skip("needs superuser (creates a role)")
    fake = "k999999999_" + scratch_suffix().split("_")[1][:4] + "0000"  # this machine, a pid that cannot exist
    schema, db, role = f"wb_fake_{fake}", f"{database_url().database}_fake_{fake}", f"wb_fake_{fake}"
    assert owner_alive(schema) is False
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        out = drop_leftovers()
        assert schema not in out["schemas"] and db not in out["databases"] and role not in out["roles"]
        assert _schema_exists(engine, schema)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}"'))
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.slow
def test_two_kernels_making_the_shared_template_at_once(engine):
    """``<db>_tpl`` is made once, under an advisory lock: two first clones at the same time both succeed."""
    from helpers.scratchdb import TEMPLATE_SUFFIX, _drop_stamped

    with _admin() as admin:
        _drop_stamped(admin, f"{database_url().database}_{TEMPLATE_SUFFIX}")  # both kernels must make it
    code = """
        from sqlalchemy import text
        from helpers import clone_database, drop_database, setup
        setup(quiet=True)
        eng = clone_database("twin")
        with eng.connect() as conn:
            print(eng.url.database, conn.execute(text("SELECT count(*) FROM users")).scalar(), flush=True)
        eng.dispose()
        assert drop_database("twin")
    """
    procs = [_python(code) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.split())
    with engine.connect() as conn:
        users = conn.execute(text("SELECT count(*) FROM users")).scalar()
    assert outs[0][0] != outs[1][0] and outs[0][1] == outs[1][1] == str(users)
    with _admin() as admin:
        names = [outs[0][0], outs[1][0], f"{database_url().database}_{TEMPLATE_SUFFIX}"]
        left = [r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,))]
    assert left == [names[2]], left  # the clones are gone, the one shared template stays


# ----------------------------------------------------------------------------- two trainees, one database
CHAPTERS = [
    "02a_reading_plans_and_indexes.ipynb",
    "03b_deadlocks_and_lock_conflicts.ipynb",
]  # the halves with cross-kernel code
NB_TIMEOUT = 1500  # per notebook: two kernels share 2 cores with other people's work


def _run_notebook_twice_at_once(notebook: str) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake"]
    cmd += [f"--nbmake-timeout={NB_TIMEOUT}", str(REPO / "notebooks" / notebook)]
    env = {**os.environ, "PLOOMBER_STATS_ENABLED": "false"}
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    done = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=NB_TIMEOUT + 300)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, ""))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("notebook", CHAPTERS)
def test_a_chapter_runs_twice_at_once_on_one_database(engine, notebook):
    with engine.connect() as conn:
        before = set(conn.execute(text("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'")).scalars())
    t0 = time.monotonic()
    runs = _run_notebook_twice_at_once(notebook)
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"run {i + 1} of {notebook} failed:\n{r.stdout[-4000:]}"
    with engine.connect() as conn:
        after = set(conn.execute(text("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'")).scalars())
    assert after - before == set(), f"scratch schemas left behind: {after - before}"
    print(f"{notebook}: two runs at once in {time.monotonic() - t0:.0f} s")
