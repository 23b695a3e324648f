"""Chapter 07 (raw SQL vs ORM): report variants, identifier allow-list, injection, bulk benchmarks, plans.

Writes go to the scratch schema ``wb_rawsql_test_<process>`` (its own name, like every kernel's), so the
tests and the notebook can run at the same time; the seeded tables are only read.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql as pgsql
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from helpers import bulk, drop_lab_schema, psycopg_conninfo, scratch_suffix, setup
from helpers.models import Order, User

TAUTOLOGY = "x' OR 'a' = 'a"
UNION = "x' UNION SELECT id, email, name FROM users --"


@pytest.fixture(scope="module")
def engine():
    return setup(quiet=True)


@pytest.fixture(scope="module")
def scratch(engine):
    eng = bulk.scratch_engine(engine, "rawsql_test")
    assert bulk.create_scratch(eng) == f"wb_rawsql_test_{scratch_suffix()}"
    yield eng
    assert drop_lab_schema(engine, bulk.schema_of(eng))


def _items(scratch) -> list[tuple]:
    with scratch.connect() as conn:
        return [
            tuple(r) for r in conn.execute(select(bulk.Item.id, bulk.Item.name, bulk.Item.value).order_by(bulk.Item.id))
        ]


# ----------------------------------------------------------------------------- the report
def test_report_variants_return_identical_rows(engine):
    with engine.connect() as conn:
        rows_text = [tuple(r) for r in conn.execute(bulk.report_text(3))]
        rows_core = [tuple(r) for r in conn.execute(bulk.report_core(3))]
    with Session(engine) as session:
        rows_orm = [tuple(r) for r in session.execute(bulk.report_orm(3))]
        rows_py = bulk.report_python(session, 3)
    assert rows_text == rows_core == rows_orm == rows_py
    regions = sorted({r[0] for r in rows_text})
    assert len(regions) == 5 and len(rows_text) == 15
    for region in regions:
        part = [r for r in rows_text if r[0] == region]
        assert [r[5] for r in part] == [1, 2, 3]
        assert [r[3] for r in part] == sorted((r[3] for r in part), reverse=True)


def test_python_report_sends_one_parameter_whatever_the_customer_count(engine):
    """An IN list binds one value per id: past 65,535 customers (`large` has 200,000) PostgreSQL refuses it."""
    from helpers import count_queries

    with Session(engine) as session, count_queries(engine) as q:
        bulk.report_python(session, 3)
    users_stmt = next(st for st in q.statements if "FROM users" in st.sql)
    assert len(users_stmt.parameters) == 1, users_stmt.parameters
    assert isinstance(next(iter(users_stmt.parameters.values())), list)


def test_report_top_n_and_totals_match_a_plain_aggregate(engine):
    with engine.connect() as conn:
        top1 = conn.execute(bulk.report_text(1)).all()
        europe = next(r for r in top1 if r.region == "europe")
        spent = conn.execute(
            select(func.sum(Order.total)).where(Order.user_id == europe.user_id, Order.status.in_(bulk.REPORT_STATUSES))
        ).scalar_one()
    assert len(top1) == 5 and all(r.rank == 1 for r in top1)
    assert europe.spent == spent


# ----------------------------------------------------------------------------- identifiers and injection
def test_allow_list_maps_known_names_to_columns():
    assert bulk.sort_column("name") is User.name
    assert bulk.sort_column("created") is User.created_at


@pytest.mark.parametrize("bad", ["name; DROP TABLE users", "password", "users.email", "NAME", "", None, "name "])
def test_allow_list_rejects_everything_else(bad):
    with pytest.raises(ValueError, match="cannot sort by"):
        bulk.sort_column(bad)


def test_users_sorted_uses_the_chosen_column(engine):
    with Session(engine) as session:
        by_name = [r.id for r in bulk.users_sorted(session, "name")]
        n_users = session.execute(select(func.count()).select_from(User)).scalar_one()
    assert by_name == sorted(range(1, n_users + 1), key=lambda i: f"User {i}")[:5]  # [1, 10, 100, 1000, 1001] at ci


def test_bound_parameters_resist_the_injection_strings(engine):
    with engine.connect() as conn:
        n_orders = conn.execute(select(func.count()).select_from(Order)).scalar_one()
        n_users = conn.execute(select(func.count()).select_from(User)).scalar_one()
        assert bulk.orders_safe(conn, 42, "paid") == bulk.orders_unsafe(conn, 42, "paid") != []
        assert bulk.orders_safe(conn, 42, TAUTOLOGY) == []
        assert bulk.orders_safe(conn, 42, UNION) == []
        # the f-string version really is vulnerable (so the safe one is tested against a real attack)
        assert len(bulk.orders_unsafe(conn, 42, TAUTOLOGY)) == n_orders
        assert sum("@" in r[1] for r in bulk.orders_unsafe(conn, 42, UNION)) == n_users


def test_stacked_drop_only_through_the_f_string(engine, scratch):
    notes = f"{bulk.schema_of(scratch)}.notes"
    payload = f"x'; DROP TABLE {notes}; --"
    with engine.begin() as conn:
        assert bulk.orders_safe(conn, 42, payload) == []
        assert conn.execute(text("SELECT to_regclass(:t)"), {"t": notes}).scalar() == notes
    with engine.begin() as conn:
        bulk.orders_unsafe(conn, 42, payload)
        assert conn.execute(text("SELECT to_regclass(:t)"), {"t": notes}).scalar() is None
    bulk.Note.__table__.create(scratch)


# ----------------------------------------------------------------------------- bulk writes and reads
def test_every_insert_method_writes_the_same_rows(scratch):
    contents = {}
    for name, fn in bulk.INSERTS.items():
        bulk.truncate_items(scratch)
        fn(scratch, 50)
        contents[name] = _items(scratch)
    expected = [(i, f"item {i}", i) for i in range(1, 51)]
    assert contents == {name: expected for name in bulk.INSERTS}


@pytest.mark.parametrize("chunk", [7, bulk.VALUES_CHUNK])
def test_every_update_method_ends_in_the_same_state(scratch, monkeypatch, chunk):
    monkeypatch.setattr(bulk, "VALUES_CHUNK", chunk)  # small chunks exercise the chunk boundaries
    for name, fn in bulk.UPDATES.items():
        bulk.fill_items(scratch, 20)
        fn(scratch, 20)
        assert _items(scratch) == [(i, f"item {i}", 2 * i) for i in range(1, 21)], name


def test_read_strategies_return_n_rows(engine):
    assert {name: fn(engine, 120) for name, fn in bulk.READS.items()} == {name: 120 for name in bulk.READS}


def test_streaming_keeps_peak_memory_below_a_list_of_objects(engine):
    _, objects = bulk.peak_memory(lambda: bulk.read_orm_objects(engine, 5000))
    _, streamed = bulk.peak_memory(lambda: bulk.read_yield_per(engine, 5000))
    assert streamed < objects * 0.5


def test_peak_memory_sees_an_allocation():
    result, peak = bulk.peak_memory(lambda: len(bytearray(4 * 2**20)))
    assert result == 4 * 2**20 and peak >= 4 * 2**20


# ----------------------------------------------------------------------------- plans
def test_generic_plan_defeats_the_index_for_an_optional_filter(engine):
    with psycopg.connect(**psycopg_conninfo(), autocommit=True, application_name="wb_rawsql_test") as pc:
        pc.execute("PREPARE wb_optional(int) AS SELECT id FROM orders WHERE ($1 IS NULL OR user_id = $1)")
        plans = {}
        for mode in ("force_custom_plan", "force_generic_plan"):
            with pc.transaction():
                pc.execute("SELECT set_config('plan_cache_mode', %s, true)", (mode,))
                plans[mode] = "\n".join(r[0] for r in pc.execute("EXPLAIN EXECUTE wb_optional(1500)"))
    assert "ix_orders_user_id" in plans["force_custom_plan"]
    assert (
        plans["force_generic_plan"].startswith("Seq Scan on orders") and "ix_orders" not in plans["force_generic_plan"]
    )


def test_gin_index_serves_containment_not_extraction(scratch):
    bulk.fill_events(scratch, 20_000)
    e = bulk.Event
    with scratch.connect() as conn:
        contains = "\n".join(bulk.explain_lines(conn, select(e.id).where(e.doc.contains({"user_id": 42}))))
        extract = "\n".join(bulk.explain_lines(conn, select(e.id).where(e.doc["user_id"].as_integer() == 42)))
        n = conn.execute(select(func.count()).where(e.doc.contains({"user_id": 42}))).scalar_one()
    assert "ix_events_doc" in contains and "ix_events_doc" not in extract and n == 21


def test_explain_lines_renders_bound_parameters(engine):
    with engine.connect() as conn:
        plan = bulk.explain_lines(conn, select(User.id).where(User.id == 7))
    assert plan[0].startswith("Index Only Scan") or "users_pkey" in "\n".join(plan)
    assert any("= 7" in line for line in plan)


def test_copy_statement_is_composed_with_identifiers(scratch):
    q = pgsql.SQL("COPY {} (name, value) FROM STDIN").format(bulk._qualified(scratch, "items"))
    assert q.as_string() == f'COPY "wb_rawsql_test_{scratch_suffix()}"."items" (name, value) FROM STDIN'
