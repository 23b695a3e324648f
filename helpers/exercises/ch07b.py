"""Exercises of chapter 07b (bulk writes and big reads): a bulk update in one statement, and a restock upsert in one round trip.

Each judge writes only to a scratch schema of its own (``wb_rawsql_ex_<kernel>``), dropped in a
``finally``; it counts the statements the answer sends (``count_queries``: an ``executemany`` is
one entry that the server runs once per row) and compares every final row with the expected
one: deterministic, so the verdict repeats.
"""

from __future__ import annotations

import sys

from sqlalchemy import Engine, Integer, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from .. import rawsql
from ..bulk import rows_for
from ..counting import count_queries
from ..scratch import drop_lab_schema
from ..waits import bounded
from . import exercise

Item, Stock = rawsql.Item, rawsql.Stock

#: exercise 1: 400 items (value = id); a price list for the odd ids up to 39, then one for every even id
ITEMS = 400
PRICE_LISTS = {
    20: [{"id": i, "value": 7 * i + 20} for i in range(1, 40, 2)],
    200: [{"id": i, "value": 7 * i + 200} for i in range(2, ITEMS + 1, 2)],
}

#: exercise 2's shelf: 200 SKUs in stock, and a delivery of 200 lines, half of them for SKUs already there
SHELF = [{"sku": f"SKU-{i:04d}", "qty": i % 7} for i in range(1, 201)]
DELIVERY = [{"sku": f"SKU-{i:04d}", "qty": 1 + i % 5} for i in range(101, 301)]


# ----------------------------------------------------------------------------- exercise 1: a bulk update in one statement


def _rows_off(got: list, expected: list) -> int:
    """How many rows differ from the expected ones, position by position, plus the missing or extra ones."""
    return sum(1 for a, b in zip(got, expected, strict=False) if a != b) + abs(len(got) - len(expected))


def solution_reprice(conn, prices: list[dict]) -> None:
    """Set each item's value: one UPDATE ... FROM unnest(:ids, :vals), two array parameters at any length."""
    items = Item.__table__
    v = (
        func.unnest(bindparam("ids", type_=ARRAY(Integer)), bindparam("vals", type_=ARRAY(Integer)))
        .table_valued("id", "value")
        .render_derived(name="v")
    )
    stmt = update(items).where(items.c.id == v.c.id).values(value=v.c.value)
    conn.execute(stmt, {"ids": [p["id"] for p in prices], "vals": [p["value"] for p in prices]})


def wrong_reprice(conn, prices: list[dict]) -> None:
    """Plausible but wrong: one call (ORM bulk UPDATE by primary key), but an executemany: one UPDATE per line."""
    with Session(conn) as session:
        session.execute(update(Item), [dict(p) for p in prices])


def _expected_items() -> list[tuple]:
    value = {i: i for i in range(1, ITEMS + 1)}
    for prices in PRICE_LISTS.values():
        value.update({p["id"]: p["value"] for p in prices})
    return sorted(value.items())


@exercise(
    "07b",
    "rawsql_reprice_unnest",
    "A bulk update in one statement: a price list of any length, one UPDATE whose text does not grow",
    solution=solution_reprice,
    wrong=wrong_reprice,
    hint="send the price list as two arrays in one statement: update(items).where(items.c.id == v.c.id)"
    ".values(value=v.c.value) with v = func.unnest(bindparam('ids', type_=ARRAY(Integer)), "
    "bindparam('vals', type_=ARRAY(Integer))).table_valued('id', 'value').render_derived(name='v'); "
    "an executemany is still one UPDATE per line on the server, and a VALUES list grows with the list.",
    namespace=lambda: names(),
)
def judge_reprice(answer, engine: Engine):
    scratch = rawsql.scratch_engine(engine, "rawsql_ex")
    schema = rawsql.schema_of(scratch)
    logs = {}
    try:
        with scratch.begin() as conn, bounded(conn, "setting up the reprice exercise's items"):
            Item.__table__.drop(conn, checkfirst=True)
            Item.__table__.create(conn)
            conn.execute(insert(Item), rows_for(ITEMS))  # value = id
        for n, prices in PRICE_LISTS.items():
            with scratch.begin() as conn, count_queries(scratch) as logs[n]:
                answer(conn, [dict(p) for p in prices])
        with scratch.connect() as conn:
            got = [tuple(r) for r in conn.execute(select(Item.id, Item.value).order_by(Item.id))]
    finally:
        drop_lab_schema(engine, schema)
    expected = _expected_items()
    wrong_rows = _rows_off(got, expected)
    texts = {n: [s.sql for s in log.statements] for n, log in logs.items()}
    measured = {
        "statements": {str(n): log.count for n, log in logs.items()},
        "executemany": {str(n): sum(s.executemany for s in log.statements) for n, log in logs.items()},
        "same_sql": texts[20] == texts[200],
        "rows_wrong": wrong_rows,
    }
    problems = []
    if wrong_rows:
        problems.append(f"{wrong_rows} of {len(expected)} items end with the wrong value")
    if any(log.count != 1 for log in logs.values()):
        problems.append(
            f"statements sent for 20 and 200 lines: {list(measured['statements'].values())}, exactly 1 wanted"
        )
    elif any(measured["executemany"].values()):
        problems.append("the one statement is an executemany: the server runs it once per line")
    elif not measured["same_sql"]:
        problems.append("the SQL text grows with the price list (a new statement to compile, and to plan, per length)")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, "1 statement for 20 lines and for 200, the same SQL text; every item right.", measured


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
    "07b",
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
    wrong_rows = _rows_off(got, expected)
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

    ns = {"Item": Item, "Stock": Stock, "Session": Session, "pg_insert": pg_insert}
    ns.update({n: getattr(sqlalchemy, n) for n in ("select", "func", "insert", "update", "text", "bindparam")})
    ns["exercises"] = sys.modules[__package__]
    return ns
