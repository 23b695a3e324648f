"""Exercises of chapter 07 (raw SQL vs ORM): a report in one statement, and a restock upsert in one round trip.

Each judge counts the statements the answer sends (``count_queries``) and compares its rows with
the reference solution's: deterministic, so the verdict repeats. The upsert judge writes only to a
scratch schema of its own (``wb_rawsql_ex_<kernel>``), dropped in a ``finally``.
"""

from __future__ import annotations

import sys

from sqlalchemy import Engine, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from .. import models, rawsql
from ..counting import count_queries
from ..scratch import drop_lab_schema
from ..waits import bounded
from . import exercise

User, Order = models.User, models.Order
Stock = rawsql.Stock

#: exercise 2's shelf: 200 SKUs in stock, and a delivery of 200 lines, half of them for SKUs already there
SHELF = [{"sku": f"SKU-{i:04d}", "qty": i % 7} for i in range(1, 201)]
DELIVERY = [{"sku": f"SKU-{i:04d}", "qty": 1 + i % 5} for i in range(101, 301)]


# ----------------------------------------------------------------------------- exercise 1: a report in one statement
def solution_busiest_per_region(session: Session) -> list[tuple]:
    """Per region, the customer with the most orders (ties: the lower id): one statement, ranked on the server."""
    counts = select(Order.user_id, func.count().label("orders")).group_by(Order.user_id).subquery()
    rank = func.row_number().over(partition_by=User.region, order_by=(counts.c.orders.desc(), User.id))
    ranked = (
        select(User.region, User.id.label("user_id"), counts.c.orders, rank.label("rank"))
        .join(counts, counts.c.user_id == User.id)
        .subquery()
    )
    stmt = select(ranked.c.region, ranked.c.user_id, ranked.c.orders).where(ranked.c.rank == 1).order_by("region")
    return [tuple(r) for r in session.execute(stmt)]


def wrong_busiest_per_region(session: Session) -> list[tuple]:
    """Plausible but wrong: right rows, but one query per region (the loop moved, not removed)."""
    regions = session.scalars(select(User.region).distinct().order_by(User.region)).all()
    out = []
    for region in regions:
        row = session.execute(
            select(User.region, User.id, func.count(Order.id).label("orders"))
            .join(Order, Order.user_id == User.id)
            .where(User.region == region)
            .group_by(User.region, User.id)
            .order_by(func.count(Order.id).desc(), User.id)
            .limit(1)
        ).one()
        out.append(tuple(row))
    return out


_reference: dict[str, list] = {}


def _busiest_reference(engine: Engine) -> list[tuple]:
    key = engine.url.render_as_string(hide_password=True)
    if key not in _reference:
        with Session(engine) as session:
            _reference[key] = solution_busiest_per_region(session)
    return _reference[key]


@exercise(
    "07",
    "rawsql_busiest_per_region",
    "The report in one statement: each region's customer with the most orders",
    solution=solution_busiest_per_region,
    wrong=wrong_busiest_per_region,
    hint="rank inside each region on the server: row_number() OVER (PARTITION BY region ORDER BY orders DESC, "
    "user id) in a subquery, and keep rank 1 in the outer SELECT.",
    namespace=lambda: names(),
)
def judge_busiest_per_region(answer, engine: Engine):
    expected = _busiest_reference(engine)
    with Session(engine) as session, count_queries(engine) as log:
        got = [tuple(r) for r in answer(session)]
    same = got == expected
    measured = {"statements": log.count, "rows": len(got), "same_rows": same}
    problems = []
    if not same:
        problems.append(f"the rows differ from the reference ({len(got)} rows, expected {len(expected)})")
    if log.count != 1:
        problems.append(f"{log.count} statements sent, exactly 1 wanted")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, f"1 statement, {len(got)} rows, the same as the reference.", measured


# ----------------------------------------------------------------------------- exercise 2: an upsert in one round trip
def solution_restock(conn, delivery: list[dict]) -> None:
    """Add each delivered quantity to the SKU's stock, inserting new SKUs: one INSERT ... ON CONFLICT DO UPDATE."""
    stmt = pg_insert(Stock).values(delivery)
    stmt = stmt.on_conflict_do_update(index_elements=[Stock.sku], set_={"qty": Stock.qty + stmt.excluded.qty})
    conn.execute(stmt)


def wrong_restock(conn, delivery: list[dict]) -> None:
    """Plausible but wrong: one statement, but the delivery overwrites the stock instead of adding to it."""
    stmt = pg_insert(Stock).values(delivery)
    stmt = stmt.on_conflict_do_update(index_elements=[Stock.sku], set_={"qty": stmt.excluded.qty})
    conn.execute(stmt)


def _expected_shelf() -> list[tuple]:
    shelf = {r["sku"]: r["qty"] for r in SHELF}
    for r in DELIVERY:
        shelf[r["sku"]] = shelf.get(r["sku"], 0) + r["qty"]
    return sorted(shelf.items())


@exercise(
    "07",
    "rawsql_restock_upsert",
    "Restock in one round trip: add a delivery to the stock, new SKUs inserted",
    solution=solution_restock,
    wrong=wrong_restock,
    hint="one pg_insert(Stock).values(delivery).on_conflict_do_update(index_elements=[Stock.sku], set_=...) "
    "where set_ adds the delivered quantity: Stock.qty + stmt.excluded.qty.",
    namespace=lambda: names(),
)
def judge_restock(answer, engine: Engine):
    scratch = rawsql.scratch_engine(engine, "rawsql_ex")
    schema = rawsql.schema_of(scratch)
    try:
        with scratch.begin() as conn, bounded(conn, "setting up the restock exercise's shelf"):
            Stock.__table__.drop(conn, checkfirst=True)
            Stock.__table__.create(conn)
            conn.execute(insert(Stock), SHELF)
        with scratch.begin() as conn, count_queries(scratch) as log:
            answer(conn, [dict(r) for r in DELIVERY])
        with scratch.connect() as conn:
            got = [tuple(r) for r in conn.execute(select(Stock.sku, Stock.qty).order_by(Stock.sku))]
    finally:
        drop_lab_schema(engine, schema)
    expected = _expected_shelf()
    same = got == expected
    wrong_rows = sum(1 for a, b in zip(got, expected, strict=False) if a != b) + abs(len(got) - len(expected))
    measured = {"statements": log.count, "rows": len(got), "rows_wrong": wrong_rows, "same_rows": same}
    problems = []
    if not same:
        problems.append(f"{wrong_rows} of {len(expected)} SKUs end with the wrong quantity")
    if log.count != 1:
        problems.append(f"{log.count} statements sent, exactly 1 wanted")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, f"1 statement; all {len(got)} SKUs hold the right quantity.", measured


def names() -> dict:
    """The names a starter cell may use (what the notebook imported)."""
    import sqlalchemy

    ns = {"User": User, "Order": Order, "Stock": Stock, "Session": Session, "pg_insert": pg_insert}
    ns.update({n: getattr(sqlalchemy, n) for n in ("select", "func", "insert", "update", "text")})
    ns["exercises"] = sys.modules[__package__]
    return ns
