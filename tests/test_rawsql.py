"""Chapters 07a and 07b's instruments: the scratch tables (``helpers.rawsql``) and the bulk-load instruments (``helpers.bulk``).

The lessons themselves (the report three ways, the injection demo, the allow-list, the bulk methods)
live in the notebooks' cells and are proven by their asserts; the exercises by ``tests/test_exercises.py``.
Writes go to the scratch schema ``wb_rawsql_test_<process>`` (its own name, like every kernel's), so the
tests and the notebook can run at the same time; the seeded tables are only read.
"""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import func, insert, select

from helpers import bulk, drop_lab_schema, psycopg_conninfo, rawsql, scratch_suffix, setup
from helpers.models import Order, User


@pytest.fixture(scope="module")
def engine():
    return setup(quiet=True)


@pytest.fixture(scope="module")
def scratch(engine):
    eng = rawsql.scratch_engine(engine, "rawsql_test")
    assert rawsql.create_scratch(eng) == f"wb_rawsql_test_{scratch_suffix()}"
    yield eng
    assert drop_lab_schema(engine, rawsql.schema_of(eng))


def _items(scratch) -> list[tuple]:
    item = rawsql.Item
    with scratch.connect() as conn:
        return [tuple(r) for r in conn.execute(select(item.id, item.name, item.value).order_by(item.id))]


# ----------------------------------------------------------------------------- rawsql: scratch tables and statements
def test_scratch_tables_live_in_the_kernels_schema_only(engine, scratch):
    schema = rawsql.schema_of(scratch)
    with engine.connect() as conn:
        found = {
            r[0]
            for r in conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = %(s)s", {"s": schema})
        }
    assert found == {"items", "notes", "stock", "events"}
    assert rawsql.schema_of(engine) == rawsql.SCHEMA  # an untranslated engine names the placeholder


def test_create_scratch_starts_clean(scratch):
    bulk.fill_items(scratch, 10)
    rawsql.create_scratch(scratch)
    assert _items(scratch) == []


def test_qualified_is_composed_with_identifiers(scratch):
    with psycopg.connect(**psycopg_conninfo()) as pc:
        text_ = rawsql.qualified(scratch, "items").as_string(pc)
    assert text_ == f'"wb_rawsql_test_{scratch_suffix()}"."items"'


def test_sql_of_renders_postgresql_placeholders():
    sql = rawsql.sql_of(select(User.id).where(User.id == 7))
    assert "FROM users" in sql and "%(id_1)s" in sql


def test_explain_lines_renders_bound_parameters(engine):
    with engine.connect() as conn:
        plan = rawsql.explain_lines(conn, select(User.id).where(User.id == 7))
    assert plan[0].startswith("Index Only Scan") or "users_pkey" in "\n".join(plan)
    assert any("= 7" in line for line in plan)


def test_gin_index_serves_containment_not_extraction(scratch):
    rawsql.fill_events(scratch, 20_000)
    e = rawsql.Event
    with scratch.connect() as conn:
        contains = "\n".join(rawsql.explain_lines(conn, select(e.id).where(e.doc.contains({"user_id": 42}))))
        extract = "\n".join(rawsql.explain_lines(conn, select(e.id).where(e.doc["user_id"].as_integer() == 42)))
        n = conn.execute(select(func.count()).where(e.doc.contains({"user_id": 42}))).scalar_one()
        urgent = conn.execute(select(func.count()).where(e.tags.contains(["urgent"]))).scalar_one()
        kinds = conn.execute(select(func.count(func.distinct(e.doc["kind"].astext)))).scalar_one()
    assert "ix_events_doc" in contains and "ix_events_doc" not in extract
    assert n == 21 and urgent == 20_000 // 97 and kinds == 5


def test_prepared_statements_and_their_plans(engine):
    """psycopg prepares from the 6th execution; the server plans 5 custom plans, then the generic one."""
    query = "SELECT id FROM orders WHERE user_id = %(u)s"
    with psycopg.connect(**psycopg_conninfo(), autocommit=True, application_name="wb_rawsql_test") as pc:
        for _ in range(12):
            pc.execute(query, {"u": 1500}).fetchall()
        seen = rawsql.prepared_statements(pc, "%WHERE user_id = $1")
        name = seen.name[0]
        custom = "\n".join(rawsql.plan_of_prepared(pc, name, 1500, "force_custom_plan"))
        generic = "\n".join(rawsql.plan_of_prepared(pc, name, 1500, "force_generic_plan"))
        assert rawsql.prepared_statements(pc, "no such statement%").empty
    assert len(seen) == 1 and seen.custom_plans[0] == 5 and seen.generic_plans[0] == 12 - pc.prepare_threshold - 5
    assert "1500" in custom and "$1" not in custom and "(user_id = $1)" in generic


def test_optional_filter_generic_plan_defeats_the_index(engine):
    with psycopg.connect(**psycopg_conninfo(), autocommit=True, application_name="wb_rawsql_test") as pc:
        pc.execute("PREPARE wb_optional(int) AS SELECT id FROM orders WHERE ($1 IS NULL OR user_id = $1)")
        custom = "\n".join(rawsql.plan_of_prepared(pc, "wb_optional", 1500, "force_custom_plan"))
        generic = "\n".join(rawsql.plan_of_prepared(pc, "wb_optional", 1500, "force_generic_plan"))
    assert "ix_orders_user_id" in custom
    assert "Seq Scan on orders" in generic and "ix_orders" not in generic


# ----------------------------------------------------------------------------- bulk: instruments
def test_rows_for_and_fill_items_write_the_same_rows(scratch):
    bulk.fill_items(scratch, 50)
    server_made = _items(scratch)
    bulk.truncate_items(scratch)
    with scratch.begin() as conn:
        conn.execute(insert(rawsql.Item.__table__), bulk.rows_for(50))
    assert server_made == _items(scratch) == [(i, f"item {i}", i) for i in range(1, 51)]


def test_truncate_items_restarts_the_identity(scratch):
    bulk.fill_items(scratch, 5)
    bulk.fill_items(scratch, 3)
    assert [r[0] for r in _items(scratch)] == [1, 2, 3]


def test_sweep_times_every_method_at_every_size_with_its_setup(scratch):
    calls = []

    def method(engine, n):
        calls.append(("run", n))

    out = bulk.sweep(
        {"a": method, "b": method}, scratch, [10, 20], setup=lambda n: calls.append(("setup", n)), repeat=2
    )
    assert list(zip(out.case, out.n, strict=True)) == [("a", 10), ("b", 10), ("a", 20), ("b", 20)]
    assert (out.rows_per_s == out.n / out.median_s).all()
    # a warm-up at the smallest size only, then 2 repeats; the setup before each of them
    assert calls.count(("run", 10)) == 2 * 3 and calls.count(("run", 20)) == 2 * 2
    assert calls.count(("setup", 10)) == calls.count(("run", 10))


def test_peak_memory_sees_an_allocation():
    result, peak = bulk.peak_memory(lambda: len(bytearray(4 * 2**20)))
    assert result == 4 * 2**20 and peak >= 4 * 2**20


def test_the_seeded_tables_are_only_read(engine, scratch):
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(Order)).scalar_one()
    bulk.fill_items(scratch, 100)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Order)).scalar_one() == before
