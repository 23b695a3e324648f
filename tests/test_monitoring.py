"""helpers.monitoring and helpers.testdb on the real server: every check can fail."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from helpers import Exporter, copied_database, drop_database, make_engine, server
from helpers import monitoring as mon
from helpers.capability import missing

SUFFIX = f"montest_{os.getpid()}"


@pytest.fixture(scope="module")
def own(engine):
    """A database of this module's own: users 1..50 and posts of those users copied from the seed."""
    eng = copied_database(SUFFIX, {"users": "id <= 50", "posts": "user_id <= 50"})
    yield eng
    eng.dispose()
    drop_database(SUFFIX)


@pytest.fixture
def shared(engine):
    eng = make_engine(poolclass=NullPool)
    yield eng
    eng.dispose()


def test_copied_database_has_the_rows_and_working_sequences(own):
    with own.begin() as conn:
        assert conn.execute(text("SELECT count(*), max(id) FROM users")).one() == (50, 50)
        new_id = conn.execute(
            text(
                "INSERT INTO users (email, name, region, country, attributes) "
                "VALUES ('seq@example.test', 'Seq', 'eu', 'DE', '{}') RETURNING id"
            )
        ).scalar()
        conn.rollback()
    assert new_id == 51


def _slow_query_log():
    """Chapter 09's SlowQueryLog, exactly as the notebook's cell defines it (the lesson lives there)."""
    nb = json.loads((Path(__file__).resolve().parent.parent / "notebooks" / "09_monitoring.ipynb").read_text())
    (cell,) = [c for c in nb["cells"] if "lesson-slow-query-log" in c.get("metadata", {}).get("tags", [])]
    ns = {"mon": mon}
    exec("".join(cell["source"]), ns)  # noqa: S102 - the chapter's own cell, under test
    return ns["SlowQueryLog"]


def test_slow_query_log_keeps_only_statements_above_threshold(shared):
    SlowQueryLog = _slow_query_log()
    with SlowQueryLog(shared, threshold_s=0.1) as log, shared.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT pg_sleep(0.15)"))
        conn.execute(text("SELECT 2"))
    assert log.seen == 3
    assert [q.sql for q in log.slow] == ["SELECT pg_sleep(0.15)"]
    assert log.slow[0].duration_s >= 0.15


def test_slow_query_log_survives_failing_statements(shared):
    SlowQueryLog = _slow_query_log()
    with SlowQueryLog(shared, threshold_s=10) as log, shared.connect() as conn:
        with pytest.raises(Exception, match="division by zero"):
            conn.execute(text("SELECT 1/0"))
        conn.rollback()
        conn.execute(text("SELECT 1"))
        assert conn.info[SlowQueryLog.KEY] == []  # the failed statement's start time was dropped
    assert log.seen == 1


def test_double_executing_timer_runs_every_statement_twice(shared):
    with shared.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE t_audit (id serial, note text)"))
        with mon.DoubleExecutingTimer(shared) as bad:
            conn.execute(text("INSERT INTO t_audit (note) VALUES ('x')"))
        conn.execute(text("INSERT INTO t_audit (note) VALUES ('y')"))  # timer removed: once
        rows = conn.execute(text("SELECT note, count(*) FROM t_audit GROUP BY note ORDER BY note")).all()
        conn.rollback()
    assert bad.extra_executions == 1
    assert rows == [("x", 2), ("y", 1)]


def test_middleware_headers_count_the_statements_of_each_request(own):
    app = mon.QueryMetricsMiddleware(mon.blog_app(own, limit=10), own)
    try:
        with own.connect() as conn:
            k = conn.execute(
                text(
                    "SELECT count(DISTINCT user_id) FROM (SELECT user_id FROM posts WHERE published "
                    "ORDER BY id DESC LIMIT 10) p"
                )
            ).scalar()
        lazy, fixed, health = (mon.wsgi_get(app, p) for p in ("/posts", "/posts-fixed", "/health"))
    finally:
        app.close()
    assert k > 1
    assert int(lazy.headers["X-DB-Queries"]) == 1 + k
    assert int(fixed.headers["X-DB-Queries"]) == 2
    assert health.headers["X-DB-Queries"] == "0" and health.body == b"ok"
    assert lazy.json() == fixed.json() and len(lazy.json()) == 10
    assert float(lazy.headers["X-DB-Time-ms"]) > 0


def test_pg_stat_statements_reset_and_read_one_database_only(own, engine):
    if reason := missing("pg_stat_statements") or missing("superuser"):
        pytest.skip(reason)
    marker_sql = "SELECT count(*) FROM users WHERE id = 1 OR id = 2 OR id = 3 OR id = 4 OR id = 5 OR id = 6 OR id = 7"
    with engine.connect() as conn:  # structurally unusual, so its pg_stat_statements entry is this text
        conn.execute(text(marker_sql))
    mon.reset_statements(own)
    assert mon.top_statements(own, limit=100).empty
    with own.connect() as conn:
        for i in range(1, 8):
            conn.execute(text(f"SELECT name FROM users WHERE id = {i}"))
    top = mon.top_statements(own, order_by="calls", limit=5)
    assert top.iloc[0]["calls"] == 7 and top.iloc[0]["query"] == "SELECT name FROM users WHERE id = $1"
    # the shared database's entries were not touched by our reset
    assert not mon.top_statements(engine, like="%OR id = $6 OR id = $7").empty
    with pytest.raises(ValueError):
        mon.top_statements(own, order_by="query; DROP TABLE users")


def test_auto_explain_plan_is_read_back_from_the_server_log(own):
    if reason := missing("auto_explain"):  # superuser and the embedded server's log
        pytest.skip(reason)
    log = server.status().log
    marker = f"wb_test_{uuid.uuid4().hex[:8]}"
    start = mon.log_size(log)
    with own.connect() as conn:
        conn.execute(text("SET auto_explain.log_min_duration = 0"))
        conn.execute(text("SET auto_explain.log_format = 'json'"))
        conn.execute(text(f"SELECT count(*) FROM users WHERE name LIKE '%x%' /* {marker} */"))
        conn.rollback()
    plans = mon.auto_explain_plans(log, start, marker)
    assert len(plans) == 1
    assert mon.plan_nodes(plans[0]["plan"]) == ["Aggregate", "Seq Scan"]


def test_prometheus_text_has_request_statement_and_pool_metrics(own):
    metrics = Exporter(own, "t")
    metrics.observe(mon.RequestStats("GET", "/a/1", 200, queries=3, db_time_s=0.002, route="/a/{id}"))
    metrics.observe(mon.RequestStats("GET", "/a/2", 500, queries=1, db_time_s=0.2, route="/a/{id}"))
    body = metrics.text()
    assert 'app_requests_total{route="/a/{id}",status="200"} 1.0' in body
    assert 'app_db_statements_total{route="/a/{id}"} 4.0' in body
    assert 'app_db_time_seconds_bucket{le="0.005",route="/a/{id}"} 1.0' in body
    assert "/a/1" not in body  # labelled by the route template, never the raw path
    samples = metrics.samples()
    size = samples[samples["name"] == "sqlalchemy_pool_size"]
    assert list(size["value"]) == [float(own.pool.size())]
    assert metrics.values()['sqlalchemy_pool_size{pool="t"}'] == own.pool.size()


def test_the_exporter_is_one_module_shared_by_chapters_05_and_09():
    import helpers
    import helpers.pooling

    assert helpers.pool_metrics is helpers.exporter.pool_metrics
    assert helpers.Exporter is helpers.exporter.Exporter
    assert not hasattr(helpers.pooling, "PoolCollector") and not hasattr(mon, "PrometheusMetrics")


def test_middleware_labels_by_route_and_survives_a_failing_statement(own):
    metrics = Exporter(own, "t")
    app = mon.QueryMetricsMiddleware(mon.blog_app(own, limit=5), own, on_request=metrics.observe)
    try:
        with own.connect() as conn:
            ids = conn.execute(text("SELECT id FROM posts ORDER BY id LIMIT 3")).scalars().all()
        for i in ids:
            assert mon.wsgi_get(app, f"/posts/{i}").status == 200
        with pytest.raises(Exception, match="division by zero"):
            mon.wsgi_get(app, "/broken")
        after = mon.wsgi_get(app, "/posts-fixed")  # the next request on a pooled connection counts right
        mon.wsgi_get(app, "/no/such/page")
    finally:
        app.close()
    v = metrics.values()
    assert v['app_requests_total{route="/posts/{id}",status="200"}'] == 3
    assert v['app_requests_total{route="/broken",status="500"}'] == 1
    assert v['app_db_statements_total{route="/broken"}'] == 1  # the failed statement is counted
    assert v['app_requests_total{route="<unmatched>",status="404"}'] == 1
    assert not any(str(i) in k for k in v for i in ids if "route=" in k)
    assert after.headers["X-DB-Queries"] == "2"
    for conn in own.pool._pool.queue:  # noqa: SLF001 - every pooled connection's timing stack is empty
        assert conn.info.get(mon.QueryMetricsMiddleware._KEY, []) == []


def test_context_var_attributes_statements_to_their_own_request_under_concurrency(own):
    """Two requests at once, in two threads, on one middleware: each gets its own count, never the other's."""
    import threading

    barrier = threading.Barrier(2, timeout=10)

    def app(environ, start_response):
        n = int(environ["PATH_INFO"].strip("/"))
        with own.connect() as conn:
            for i in range(n):
                conn.execute(text("SELECT :i"), {"i": i})
                if i == 0:
                    barrier.wait()  # both requests are inside at once, interleaving their statements
        start_response("200 OK", [])
        return [b""]

    mw = mon.QueryMetricsMiddleware(app, own)
    out = {}
    try:
        threads = [threading.Thread(target=lambda n=n: out.update({n: mon.wsgi_get(mw, f"/{n}")})) for n in (3, 11)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        mw.close()
    assert {n: int(r.headers["X-DB-Queries"]) for n, r in out.items()} == {3: 3, 11: 11}
