"""Chapters 01a and 01b (loading): exercises, count_queries against pg_stat_statements, selectin batching, latency proxy.

The ``engine`` fixture (the shared workbook engine) comes from conftest.py.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, select, text, update
from sqlalchemy.orm import Session, selectinload

from helpers import count_queries, exercises, get_engine, lab_schema, latency, models
from helpers.capability import missing

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01a_n_plus_one.ipynb"


# ----------------------------------------------------------------------------- exercises
# tests/test_exercises.py proves every chapter's exercises (starter, wrong answer, solution, twice).
def test_chapter_01_checker_measures_statements_rows_and_the_result(engine):
    ok = exercises.check("no_cartesian", exercises.EXERCISES["no_cartesian"].solution, engine)
    assert ok.passed and ok.same_result and ok.statements <= ok.max_statements and ok.rows <= ok.max_rows


# ----------------------------------------------------------------------------- loader counts
@pytest.mark.parametrize("n", [1, 499, 500, 501, 1000, 1001])
def test_selectin_sends_one_plus_ceil_n_over_500(engine, n):
    User = models.User
    stmt = select(User).order_by(User.id).limit(n).options(selectinload(User.posts))
    with Session(engine) as session, count_queries(engine) as log:
        users = session.scalars(stmt).all()
    assert len(users) == n
    assert log.count == 1 + math.ceil(n / 500)
    assert [len(s.parameters) for s in log.statements[1:]] == [min(500, n - i) for i in range(0, n, 500)]


# ----------------------------------------------------------------------------- count_queries vs the server
STATS = text(
    "SELECT queryid, calls FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE :pattern"
)


def test_count_queries_agrees_with_pg_stat_statements(engine):
    if reason := missing("pg_stat_statements"):
        pytest.skip(reason)
    schema = lab_schema(engine, "loading")
    name = f"probe_{uuid.uuid4().hex[:12]}"  # unique: no other session can add calls to these statements
    md = MetaData(schema=schema)
    t = Table(name, md, Column("id", Integer, primary_key=True), Column("v", String(20)))
    md.create_all(engine)
    try:
        with engine.connect() as conn:
            before = dict(conn.execute(STATS, {"pattern": f"%{name}%"}).all())
        with count_queries(engine) as log:
            with engine.begin() as conn:
                conn.execute(insert(t), [{"id": i, "v": "a"} for i in range(20)])  # executemany
                conn.execute(
                    insert(t).returning(t.c.id), [{"id": i, "v": "b"} for i in range(20, 30)]
                )  # insertmanyvalues
                conn.execute(
                    update(t).where(t.c.id == bindparam("k")).values(v=bindparam("nv")),
                    [{"k": i, "nv": "c"} for i in range(5)],
                )  # executemany
                for i in range(12):  # an N+1 by hand
                    conn.execute(select(t.c.v).where(t.c.id == i)).all()
                conn.execute(select(t).order_by(t.c.id)).all()
        with engine.connect() as conn:
            after = dict(conn.execute(STATS, {"pattern": f"%{name}%"}).all())
    finally:
        md.drop_all(engine)
    server_calls = sum(calls - before.get(qid, 0) for qid, calls in after.items())
    assert log.count == 3 + 12 + 1
    assert log.executions == 20 + 1 + 5 + 12 + 1
    assert server_calls == log.executions, (server_calls, log.executions, log.count)


# ----------------------------------------------------------------------------- the latency proxy
def test_latency_proxy_adds_the_delay_counts_bytes_and_stops(engine):
    direct = latency.round_trip_ms(engine)
    with latency.latency_proxy(0) as proxy:
        through = proxy.make_engine(pool_size=1)
        base = latency.round_trip_ms(through)
        proxy.set_delay(2.0)
        delayed = latency.round_trip_ms(through, repeat=10)
        with through.connect() as conn:
            before = proxy.stats()["bytes"]["to_client"]
            conn.execute(text("SELECT repeat('x', 100000)")).scalar()
            moved = proxy.stats()["bytes"]["to_client"] - before
        assert proxy.process.poll() is None
    assert base < 2 + direct * 5
    assert delayed > base + 3.5  # about 2 x 2 ms more per round trip
    assert 100_000 <= moved < 110_000
    assert proxy.process.poll() is not None  # stopped (and reaped) by the context manager


def test_latency_proxy_bandwidth_limit_costs_time_per_byte():
    with latency.latency_proxy(0) as proxy:
        through = proxy.make_engine(pool_size=1)
        q = text("SELECT repeat('x', 1000000)")
        with through.connect() as conn:
            conn.execute(q).scalar()
            t0 = time.perf_counter()
            conn.execute(q).scalar()
            fast = time.perf_counter() - t0
            proxy.set_bandwidth(80)  # 1 MB at 10 MB/s: at least 0.1 s
            t0 = time.perf_counter()
            conn.execute(q).scalar()
            slow = time.perf_counter() - t0
    assert slow >= 0.1 and slow > fast + 0.05


def test_latency_proxy_exits_when_its_parent_goes_away():
    proxy = latency.start_proxy(0)
    try:
        proxy.process.stdin.close()  # what the kernel does when the parent dies
        proxy.process.wait(timeout=5)
        assert proxy.process.returncode == 0
    finally:
        proxy.close()


def test_url_goes_through_the_proxy():
    with latency.latency_proxy(0) as proxy:
        assert proxy.url.host == "127.0.0.1" and proxy.url.port == proxy.port
        assert proxy.url.database == get_engine().url.database
