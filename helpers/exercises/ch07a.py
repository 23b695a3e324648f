"""Exercises of chapter 07a (reports in SQL and the ORM): a report in one statement, and a sort chosen by the caller, safely.

Each judge counts the statements the answer sends and compares its rows with the reference
solution's: deterministic, so the verdict repeats. The sort judge sends its hostile inputs in a
session it rolls back, and counts every statement the answer tries to send (a statement the server
refuses counts too). Neither writes.
"""

from __future__ import annotations

import sys

from sqlalchemy import Engine, event, func, literal_column, select
from sqlalchemy.orm import Session

from .. import models
from ..counting import count_queries
from ..waits import bounded
from . import exercise

User, Order = models.User, models.Order

#: exercise 2: the choices an honest caller has, and what an attacker sends instead (none of them writes)
SORTS = ("total", "status", "created_at")
DIRECTIONS = ("asc", "desc")
HOSTILE = [
    ("total; SELECT email FROM users", "asc"),  # a stacked statement
    ("(SELECT max(email) FROM users)", "asc"),  # a subquery that reads another table
    ("password", "asc"),  # not a column the caller may see
    (None, "asc"),
    ("total", "desc, (SELECT max(email) FROM users)"),  # the direction is an identifier too
    ("total", "sideways"),
]


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


_reference: dict = {}  # the reference's rows, per database (computed once)


def _busiest_reference(engine: Engine) -> list[tuple]:
    key = engine.url.render_as_string(hide_password=True)
    if key not in _reference:
        with Session(engine) as session:
            _reference[key] = solution_busiest_per_region(session)
    return _reference[key]


@exercise(
    "07a",
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


# ----------------------------------------------------------------------------- exercise 2: a sort the caller picks
def solution_orders_sorted(session: Session, sort: str, direction: str = "asc") -> list[int]:
    """The first 10 order ids by the caller's column and direction: words mapped through allow-lists to SQL."""
    sortable = {"total": Order.total, "status": Order.status, "created_at": Order.created_at}
    column = sortable.get(sort) if isinstance(sort, str) else None
    if column is None or direction not in ("asc", "desc"):
        raise ValueError(f"cannot sort by {sort!r} {direction!r}: choose one of {sorted(sortable)}, asc or desc")
    order = column.desc() if direction == "desc" else column.asc()
    return session.scalars(select(Order.id).order_by(order, Order.id).limit(10)).all()


def wrong_orders_sorted(session: Session, sort: str, direction: str = "asc") -> list[int]:
    """Plausible but wrong: right for every honest caller, but the caller's word becomes SQL verbatim."""
    column = literal_column(sort)  # the wrong answer: any text the caller sends is pasted into ORDER BY
    order = column.desc() if direction == "desc" else column.asc()
    return session.scalars(select(Order.id).order_by(order, Order.id).limit(10)).all()


def _sorted_reference(engine: Engine) -> dict[tuple[str, str], list[int]]:
    key = ("sorted", engine.url.render_as_string(hide_password=True))
    if key not in _reference:
        with Session(engine) as session:
            _reference[key] = {(s, d): list(solution_orders_sorted(session, s, d)) for s in SORTS for d in DIRECTIONS}
    return _reference[key]


@exercise(
    "07a",
    "rawsql_sort_allow_list",
    "A sort the caller picks: only allowed columns and directions, refused before any SQL is sent",
    solution=solution_orders_sorted,
    wrong=wrong_orders_sorted,
    hint="a bound parameter is a value, never a column, and text pasted into SQL is the attacker's: map the "
    "caller's word through a dict to a Column (Order.total, ...), pick .asc() or .desc() the same way, "
    "and raise ValueError for anything else before building the statement.",
    namespace=lambda: names(),
)
def judge_sort_allow_list(answer, engine: Engine):
    expected = _sorted_reference(engine)
    wrong_rows = []
    for (sort, direction), ids in expected.items():
        with Session(engine) as session:
            if list(answer(session, sort, direction)) != ids:
                wrong_rows.append(f"{sort} {direction}")
    tried: list[str] = []  # every statement the answer tries to send, the ones the server refuses too

    def tries(conn, cursor, statement, parameters, context, executemany):
        tried.append(statement)

    not_refused, sent = [], 0
    event.listen(engine, "before_cursor_execute", tries)
    try:
        for sort, direction in HOSTILE:
            # closed without a commit: rolled back, whatever the answer sent; every wait bounded
            with (
                Session(engine) as session,
                bounded(session, "the sort exercise's hostile inputs", statement_timeout="5s"),
            ):
                before = len(tried)  # bounded's own statements are not the answer's
                try:
                    answer(session, sort, direction)
                    raised = None
                except ValueError:
                    raised = ValueError
                except Exception as exc:  # noqa: BLE001 - the server (or the library) refused it, not the answer
                    raised = type(exc)
                mine = len(tried) - before
            sent += mine
            if raised is not ValueError or mine:
                not_refused.append(repr(sort) if direction in DIRECTIONS else f"direction {direction!r}")
    finally:
        event.remove(engine, "before_cursor_execute", tries)
    measured = {
        "valid_right": len(expected) - len(wrong_rows),
        "hostile_refused": len(HOSTILE) - len(not_refused),
        "hostile_statements": sent,
    }
    problems = []
    if wrong_rows:
        problems.append(f"wrong ids for {len(wrong_rows)} of {len(expected)} honest choices ({', '.join(wrong_rows)})")
    if not_refused:
        problems.append(
            f"{len(not_refused)} of {len(HOSTILE)} hostile inputs were not refused with a ValueError before any SQL "
            f"was sent ({', '.join(not_refused)})"
        )
    if problems:
        return False, "; ".join(problems) + ".", measured
    return (
        True,
        f"all {len(expected)} honest choices right; all {len(HOSTILE)} hostile inputs refused, no SQL sent.",
        measured,
    )


def names() -> dict:
    """The names a starter cell may use (what the notebook imported)."""
    import sqlalchemy

    ns = {"User": User, "Order": Order, "Session": Session}
    ns.update({n: getattr(sqlalchemy, n) for n in ("select", "func", "insert", "update", "text")})
    ns["exercises"] = sys.modules[__package__]
    return ns
