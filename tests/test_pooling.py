"""helpers.pooling and helpers.pgbouncer against the real server (no mocks of the database)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import NullPool

from helpers import get_engine, make_engine, setup
from helpers.config import REPO_ROOT, SERVER_USER, is_root
from helpers.exporter import metrics_text, parse_metrics, pool_metrics
from helpers.pooling import (
    PoolEventLog,
    connection_budget,
    error_summary,
    health_check,
    limited_role,
    pool_status,
    terminate_backends,
)
from helpers.poolload import run_threads, warm

APP = f"wb_pool_t{os.getpid()}"


@pytest.fixture(scope="module")
def engine():
    setup(quiet=True)
    return get_engine()


@pytest.fixture
def pooled():
    eng = make_engine(pool_size=2, max_overflow=1, pool_timeout=1, connect_args={"application_name": f"{APP}_p"})
    yield eng
    eng.dispose()


def test_pool_status_counts_checked_out_and_overflow(pooled):
    assert pool_status(pooled).checked_out == 0
    with pooled.connect() as a, pooled.connect() as b, pooled.connect() as c:
        for conn in (a, b, c):
            conn.execute(text("SELECT 1"))
        st = pool_status(pooled)
    assert (st.size, st.checked_out, st.checked_in, st.overflow, st.capacity) == (2, 3, 0, 1, 3)
    after = pool_status(pooled)
    assert (after.checked_out, after.checked_in) == (0, 2)  # the overflow connection was closed on checkin


def test_pool_status_of_nullpool_has_no_figures():
    eng = make_engine(poolclass=NullPool)
    try:
        st = pool_status(eng)
        assert st.pool_class == "NullPool" and st.checked_out is None and st.capacity is None
    finally:
        eng.dispose()


def test_event_log_counts_exactly_and_detaches(pooled):
    log = PoolEventLog(pooled)
    for _ in range(3):
        with pooled.connect() as conn:
            conn.execute(text("SELECT 1"))
    counts = log.counts()
    assert (counts["connect"], counts["checkout"], counts["checkin"]) == (1, 3, 3)
    assert list(log.df["event"])[:3] == ["connect", "checkout", "checkin"]
    log.close()
    with pooled.connect():
        pass
    assert log.counts()["checkout"] == 3


def test_health_check_ok_saturated_and_down(pooled):
    assert health_check(pooled).status == "ok"
    with pooled.connect() as a, pooled.connect() as b, pooled.connect() as c:
        for conn in (a, b, c):
            conn.execute(text("SELECT 1"))
        report = health_check(pooled)
    assert report.status == "saturated" and report.pool["checked_out"] == 3
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = create_engine(pooled.url.set(port=port), connect_args={"connect_timeout": 2})
    try:
        down = health_check(dead)
    finally:
        dead.dispose()
    assert down.status == "down" and "refused" in down.error.lower()


def test_prometheus_registry_is_its_own_and_matches_the_pool(pooled):
    from prometheus_client import REGISTRY

    log = PoolEventLog(pooled)
    registry = pool_metrics(pooled, name="t", log=log)
    with pooled.connect() as a, pooled.connect() as b:
        a.execute(text("SELECT 1"))
        b.execute(text("SELECT 1"))
        m = parse_metrics(metrics_text(registry))
    assert m['sqlalchemy_pool_checked_out{pool="t"}'] == 2
    assert m['sqlalchemy_pool_checkouts_total{pool="t"}'] == 2
    assert m['sqlalchemy_pool_connects_total{pool="t"}'] == 2
    assert REGISTRY.get_sample_value("sqlalchemy_pool_checked_out", {"pool": "t"}) is None
    log.close()


def test_terminate_backends_only_touches_the_named_ones(engine):
    victim = make_engine(pool_size=1, connect_args={"application_name": f"{APP}_victim"})
    bystander = make_engine(pool_size=1, connect_args={"application_name": f"{APP}_bystander"})
    try:
        warm(victim, 1)
        warm(bystander, 1)
        assert terminate_backends(engine, f"{APP}_victim") == 1
        with pytest.raises(exc.OperationalError) as info:
            with victim.connect() as conn:
                conn.execute(text("SELECT 1"))
        assert info.value.connection_invalidated
        with bystander.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        victim.dispose()
        bystander.dispose()
    with pytest.raises(ValueError):
        terminate_backends(engine, "someone_else")


def test_limited_role_enforces_its_limit_and_is_dropped(engine):
    with engine.connect() as conn:
        superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    if not superuser:
        pytest.skip("needs superuser to create a role")
    with limited_role(limit=1) as url:
        name = url.username
        app = create_engine(url, poolclass=NullPool)
        try:
            with app.connect():
                with pytest.raises(exc.OperationalError) as info:
                    app.connect()
        finally:
            app.dispose()
        assert error_summary(info.value)["message"] == f'too many connections for role "{name}"'
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": name}).scalar_one() == 0


def test_run_threads_counts_tasks_and_busy_connections_fit_the_pool():
    eng = make_engine(pool_size=2, max_overflow=0, connect_args={"application_name": f"{APP}_run"})
    try:
        warm(eng, 2)
        r = run_threads(eng, workers=4, tasks=20, stmt=text("SELECT pg_sleep(0.005)"))
    finally:
        eng.dispose()
    assert r["tasks"] == 20 and r["workers"] == 4
    assert r["throughput_per_s"] * r["held_ms"] / 1000 <= 2 * 1.05
    assert r["wait_ms"] > 0 and r["p95_ms"] >= r["p50_ms"]


def test_connection_budget_arithmetic(engine):
    b = connection_budget(engine)
    assert (
        b["for_applications"] == b["max_connections"] - b["superuser_reserved_connections"] - b["reserved_connections"]
    )
    assert 1 <= b["client_backends_now"] <= b["max_connections"]


def test_throwaway_demo_refuses_a_state_folder_that_is_not_its_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WORKBOOK_STATE"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    for state in (None, tmp_path):  # the workbook's own folder, and one not named wb-pool-*
        if state is not None:
            env["WORKBOOK_STATE"] = str(state)
        res = subprocess.run(
            [sys.executable, "-m", "helpers.too_many_clients", "6", "3"],
            env=env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0 and "refusing to run" in res.stderr, state


# ----------------------------------------------------------------------------- PgBouncer
def test_pgbouncer_missing_says_how_to_install(monkeypatch):
    from helpers import pgbouncer

    monkeypatch.setattr(pgbouncer, "pgbouncer_binary", lambda: None)
    monkeypatch.delenv(pgbouncer.URL_VARIABLE, raising=False)
    ok, how = pgbouncer.pgbouncer_available()
    assert not ok and "apt-get install pgbouncer" in how
    with pytest.raises(pgbouncer.WorkbookError, match="not installed"):
        pgbouncer.PgBouncer.start()


@pytest.fixture(scope="module")
def bouncer(engine):
    from helpers.pgbouncer import PgBouncer, pgbouncer_available

    ok, how = pgbouncer_available()
    if not ok:
        pytest.skip(how)
    b = PgBouncer.start(pool_size=2)
    yield b
    b.stop()


def test_pgbouncer_url_attaches_to_a_running_one_and_never_stops_it(bouncer, monkeypatch):
    from helpers import pgbouncer

    url = bouncer.url().set(drivername="postgresql").render_as_string(hide_password=False)
    monkeypatch.setenv(pgbouncer.URL_VARIABLE, url)
    ok, how = pgbouncer.pgbouncer_available()
    assert ok and pgbouncer.URL_VARIABLE in how
    attached = pgbouncer.start_or_attach(pool_size=5)  # the variable wins: nothing is started
    assert attached.external and attached.process is None and attached.port == bouncer.port
    assert (attached.version, attached.pool_mode, attached.pool_size) == (bouncer.version, "transaction", 2)
    assert attached.tracks_prepared == bouncer.tracks_prepared
    with psycopg.connect(**attached.conninfo(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    attached.stop()  # not ours: still serving
    assert bouncer.running and not attached.running
    with psycopg.connect(**bouncer.conninfo(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_pgbouncer_runs_unprivileged_and_multiplexes(bouncer):
    if is_root():
        owner = subprocess.run(["ps", "-o", "user=", "-p", str(bouncer.process.pid)], capture_output=True, text=True)
        assert owner.stdout.strip() == SERVER_USER
    assert bouncer.show("VERSION").iloc[0, 0].startswith("PgBouncer ")
    conns = [psycopg.connect(**bouncer.conninfo(application_name=f"{APP}_b"), autocommit=True) for _ in range(5)]
    try:
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
        counts = bouncer.connection_counts()
    finally:
        for c in conns:
            c.close()
    assert counts["clients"] == 5 and 1 <= counts["servers"] <= 2 and len(pids) <= 2


def test_pgbouncer_transaction_mode_loses_session_state(bouncer):
    a = psycopg.connect(**bouncer.conninfo(), autocommit=True)
    b = psycopg.connect(**bouncer.conninfo(), autocommit=True)
    try:
        a.execute("SET statement_timeout = '4321ms'")
        with b.transaction():
            seen_b = b.execute("SHOW statement_timeout").fetchone()[0]  # LIFO: the backend A just released
            seen_a = a.execute("SHOW statement_timeout").fetchone()[0]
        b.execute("RESET statement_timeout")
    finally:
        a.close()
        b.close()
    assert (seen_a, seen_b) == ("0", "4321ms")


def test_pgbouncer_prepared_statements_match_the_version(bouncer):
    from helpers.pgbouncer import tracks_prepared_statements

    a = psycopg.connect(**bouncer.conninfo(), autocommit=True)
    b = psycopg.connect(**bouncer.conninfo(), autocommit=True)
    try:
        for n in range(7):
            a.execute("SELECT %s::int + 1", (n,))
        with b.transaction():
            b.execute("SELECT 1")
            if tracks_prepared_statements(bouncer.version):
                a.execute("SELECT %s::int + 1", (9,))
            else:
                with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                    a.execute("SELECT %s::int + 1", (9,))
    finally:
        a.close()
        b.close()


def test_pgbouncer_stop_leaves_nothing(engine):
    from helpers.pgbouncer import PgBouncer, pgbouncer_available

    if not pgbouncer_available()[0]:
        pytest.skip("pgbouncer not installed")
    b = PgBouncer.start(pool_size=1)
    with psycopg.connect(**b.conninfo(application_name=f"{APP}_stop"), autocommit=True) as c:
        c.execute("SELECT 1")
    workdir, port = Path(b.workdir), b.port
    b.stop()
    assert not b.running and not workdir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=port, user="x", dbname="x", connect_timeout=2)
    with engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"), {"a": f"{APP}_stop"}
        ).scalar_one()
    assert n == 0


# ----------------------------------------------------------------------------- the sizing sweep (chapter 05, section 3)
def test_fair_gate_serves_waiters_in_arrival_order_and_the_releaser_queues_behind_them():
    import threading
    import time

    from helpers.poolload import FairGate

    gate = FairGate(1)
    assert gate.acquire(0)  # the only permit
    order, started = [], []

    def waiter(name):
        started.append(name)
        assert gate.acquire(5)
        order.append(name)
        gate.release()

    threads = []
    for name in ("b", "c"):  # b queues first, then c
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        while len(gate._waiters) < len(threads):
            time.sleep(0.001)
    gate.release()  # the permit goes to b, not back to the pool...
    assert gate.acquire(5)  # ...so the releasing thread asks again and gets it only after b and c
    order.append("a")
    gate.release()
    for t in threads:
        t.join(5)
    assert order == ["b", "c", "a"]
    assert gate._free == 1 and not gate._waiters


def test_fair_gate_timeout_gives_up_and_leaves_the_line():
    from helpers.poolload import FairGate

    gate = FairGate(1)
    assert gate.acquire(0)
    assert gate.acquire(0.05) is False
    assert not gate._waiters
    gate.release()
    assert gate._free == 1


def test_closed_loop_counts_every_task_once_and_the_fair_queue_takes_turns():
    from helpers.poolload import FairGate, closed_loop

    eng = make_engine(pool_size=1, max_overflow=0, connect_args={"application_name": f"{APP}_loop"})
    try:
        warm(eng, 1)
        stmt = text("SELECT pg_sleep(0.005)")
        plain = closed_loop(eng, workers=4, duration_s=0.4, stmt=stmt)
        fair = closed_loop(eng, workers=4, duration_s=0.4, stmt=stmt, gate=FairGate(1), settle_s=0.05)
    finally:
        eng.dispose()
    for r in (plain, fair):
        assert sum(r["per_worker"]) == r["tasks"] > 0 and len(r["per_worker"]) == 4
        assert r["busy_connections"] <= 1.001  # one connection: never more than one checked out
        assert 3.6 <= r["in_system"] <= 4.001  # a closed loop: every worker always has a request in the system
    assert max(fair["per_worker"]) - min(fair["per_worker"]) <= 2  # FIFO: everybody in turn
    assert 0.7 <= fair["littles_L"] / fair["in_system"] <= 1.3  # L = lambda x W when every request is served
    # QueuePool hands the connection back to the thread that returned it: one thread does most of the work,
    # and the starved requests are invisible to lambda x W of the completed ones
    assert plain["busiest_share"] > 0.5 and plain["littles_L"] < 0.5 * plain["in_system"]


def test_sizing_sweep_gives_one_row_per_point_and_repeat():
    from helpers.poolload import sizing_sweep, spread

    df = sizing_sweep([1, 2], [1, 2], duration_s=0.1, service_ms=2, repeats=3, app=f"{APP}_sweep")
    assert len(df) == 2 * 2 * 3 and set(df["repeat"]) == {0, 1, 2} and set(df["queue"]) == {"fair"}
    s = spread(df, ["pool_size", "workers"], "throughput_per_s")
    assert len(s) == 4 and (s["min"] <= s["median"]).all() and (s["median"] <= s["max"]).all()


# ----------------------------------------------------------------------------- a lost reply to COMMIT (chapter 05b, section 2)
def test_commit_reply_dropper_loses_the_reply_but_not_the_commit(engine):
    from helpers import CommitReplyDropper

    app = f"{APP}_proxy"
    with CommitReplyDropper(engine.url.host, engine.url.port) as proxy:
        via = create_engine(proxy.url(engine.url), pool_size=1, connect_args={"application_name": app})
        try:
            with via.begin() as conn:  # passes untouched while not armed
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
            proxy.arm()
            with pytest.raises(exc.OperationalError) as info:
                with via.begin() as conn:
                    committed_in = conn.execute(text("SELECT pg_current_xact_id()::text")).scalar_one()
            assert info.value.connection_invalidated and proxy.dropped == 1
            with via.begin() as conn:  # disarmed after one: the next transaction goes through
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            via.dispose()
    with engine.connect() as conn:
        status = conn.execute(text("SELECT pg_xact_status(CAST(:x AS xid8))"), {"x": committed_in}).scalar_one()
    assert status == "committed"  # the server kept what the client never heard about
