"""Exercises of chapter 02a (reading plans and designing indexes): checkers that read the plan, and reference solutions.

Each judge builds its own small table in a scratch schema of this process (``lab_schema``), runs
the learner's answer against it, reads the plan of ``EXPLAIN (ANALYZE, BUFFERS)`` and drops the
schema in a ``finally``. It judges what does not vary between runs: the scan node, the index it
uses, heap fetches, shared buffers touched and the rows returned; never a timing.
"""

from __future__ import annotations

import datetime as dt
import sys

from sqlalchemy import Column, DateTime, Engine, Index, Integer, MetaData, Numeric, Table, func, select, text
from sqlalchemy.pool import NullPool

from ..database import make_engine
from ..plans import explain
from ..scratch import drop_lab_schema
from ..seed import lab_schema
from ..waits import bounded
from . import exercise

#: exercise 1: the query, its range of accounts and the buffer budget
IOS_QUERY = "SELECT sum(amount) FROM events WHERE account_id BETWEEN :lo AND :hi"
IOS_RANGE = {"lo": 100, "hi": 120}
IOS_MAX_BUFFERS = 20
IOS_ROWS = 100_000
#: exercise 2: the day asked for
DAY = dt.date(2024, 3, 1)
DAY_ROWS = 100_000


def _lab_engine(schema: str) -> Engine:
    """An engine whose sessions see ``schema`` first (the learner's SQL names its tables bare)."""
    options = "-c search_path=" + schema + ",public -c max_parallel_workers_per_gather=0"
    return make_engine(poolclass=NullPool, connect_args={"options": options, "application_name": schema})


# ----------------------------------------------------------------------------- exercise 1: index-only scan
def solution_index_only() -> list[str]:
    """A covering index holds every column the query reads; VACUUM sets the visibility map so no heap visit is needed."""
    return [
        "CREATE INDEX ix_events_account_amount ON events (account_id) INCLUDE (amount)",
        "VACUUM events",
    ]


def wrong_index_only() -> list[str]:
    """Plausible but wrong: the right index, but the table was never vacuumed (its visibility map is empty)."""
    return ["CREATE INDEX ix_events_account_amount ON events (account_id, amount)"]


def _build_events(conn, rows: int) -> None:
    conn.execute(
        text(
            "CREATE TABLE events (id bigint PRIMARY KEY, account_id int NOT NULL, amount numeric(10,2) NOT NULL, "
            "payload text NOT NULL) WITH (autovacuum_enabled = false)"
        )
    )
    conn.execute(
        text(
            "INSERT INTO events SELECT g, 1 + (hashint8(g) & 1048575) % 5000, 1 + (hashint8(g + 1) & 65535) % 999, "
            "rpad('event ' || g, 80, '.') FROM generate_series(1, :n) AS g"
        ),
        {"n": rows},
    )
    conn.execute(text("ANALYZE events"))


def judge_index_only(answer, engine: Engine):
    statements = list(answer())
    schema = lab_schema(engine, "ex02_ios")
    lab = _lab_engine(schema)
    try:
        with lab.begin() as conn:
            _build_events(conn, IOS_ROWS)
        with (
            lab.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
            bounded(conn, "your DDL on the exercise's table", session=True),
        ):
            for stmt in statements:  # the learner's DDL (VACUUM cannot run inside a transaction)
                conn.execute(text(stmt))
        plan = explain(IOS_QUERY, IOS_RANGE, engine=lab)
    finally:
        lab.dispose()
        drop_lab_schema(engine, schema)
    scan = plan.scans.iloc[0]
    fetches = (
        None
        if scan["heap_fetches"] is None or scan["heap_fetches"] != scan["heap_fetches"]
        else int(scan["heap_fetches"])
    )
    measured = {
        "node": scan["node_type"],
        "index": scan["index"] if isinstance(scan["index"], str) else None,
        "heap_fetches": fetches,
        "buffers": plan.shared_blocks,
        "max_buffers": IOS_MAX_BUFFERS,
    }
    problems = []
    if scan["node_type"] != "Index Only Scan":
        problems.append(f"the planner chose a {scan['node_type']}, not an Index Only Scan")
    elif fetches:
        problems.append(f"an Index Only Scan, but with {fetches} heap fetches")
    if plan.shared_blocks > IOS_MAX_BUFFERS:
        problems.append(f"{plan.shared_blocks} shared buffers touched, at most {IOS_MAX_BUFFERS} allowed")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, f"Index Only Scan on {measured['index']}, 0 heap fetches, {plan.shared_blocks} buffers.", measured


exercise(
    "02a",
    "explain_index_only",
    f"An Index Only Scan for sum(amount) of accounts {IOS_RANGE['lo']}-{IOS_RANGE['hi']}, "
    f"under {IOS_MAX_BUFFERS} shared buffers",
    solution=solution_index_only,
    wrong=wrong_index_only,
    hint="the index must hold every column the query reads, and only VACUUM (or COPY FREEZE) marks pages all-visible.",
)(judge_index_only)


# ----------------------------------------------------------------------------- exercise 2: a sargable predicate
def solution_one_day(events, day):
    """Leave the indexed column bare: a half-open range on created_at is what the B-tree can seek."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return select(events.c.id).where(events.c.created_at >= start, events.c.created_at < start + dt.timedelta(days=1))


def wrong_one_day(events, day):
    """Plausible but wrong: the function moved, but it still wraps the column, so the index cannot be used."""
    return select(events.c.id).where(func.date_trunc("day", events.c.created_at) == day)


def _day_table(schema: str) -> Table:
    return Table(
        "events",
        MetaData(schema=schema),
        Column("id", Integer, primary_key=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("amount", Numeric(10, 2), nullable=False),
        Index("ix_events_created_at", "created_at"),
    )


def judge_one_day(answer, engine: Engine):
    schema = lab_schema(engine, "ex02_day")
    events = _day_table(schema)
    path = {"s": schema + ",public"}
    start = dt.datetime.combine(DAY, dt.time(), tzinfo=dt.UTC)
    try:
        with engine.begin() as conn, bounded(conn, "building the exercise's table"):
            conn.execute(text("SELECT set_config('search_path', :s, true)"), path)
            events.metadata.create_all(conn)  # the table and its index on created_at
            conn.execute(
                text(
                    "INSERT INTO events SELECT g, timestamptz '2024-01-01 00:00:00+00' + g * interval '5 minutes', "
                    "(g % 1000) / 10.0 FROM generate_series(1, :n) AS g"
                ),
                {"n": DAY_ROWS},
            )
            conn.execute(text("ANALYZE events"))
        stmt = answer(events, DAY)
        reference = select(events.c.id).where(
            events.c.created_at >= start, events.c.created_at < start + dt.timedelta(days=1)
        )
        with engine.begin() as conn:
            plan = explain(stmt, engine=conn)
            got = sorted(r[0] for r in conn.execute(stmt))
            expected = sorted(r[0] for r in conn.execute(reference))
    finally:
        drop_lab_schema(engine, schema)
    indexes = sorted({i for i in plan.nodes["index"].dropna()})
    measured = {"rows": len(got), "expected_rows": len(expected), "same_rows": got == expected, "indexes": indexes}
    problems = []
    if got != expected:
        problems.append(f"{len(got)} rows returned, {len(expected)} expected (the events of {DAY} only)")
    if "ix_events_created_at" not in indexes:
        problems.append(f"the plan reads events with a {plan.scans.iloc[0]['node_type']}, not ix_events_created_at")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, f"{len(got)} rows, through ix_events_created_at ({plan.scans.iloc[0]['node_type']}).", measured


exercise(
    "02a",
    "explain_sargable",
    f"The events of {DAY} through the index on created_at (a sargable predicate)",
    solution=solution_one_day,
    wrong=wrong_one_day,
    hint="an index on created_at serves conditions on created_at itself; compare the bare column with a "
    "half-open range [day, next day).",
    namespace=lambda: names(),
)(judge_one_day)


def names() -> dict:
    """The names a starter cell may use (what the notebook imported)."""
    import sqlalchemy

    ns = {n: getattr(sqlalchemy, n) for n in ("select", "func", "cast", "Date", "and_", "text")}
    ns.update({"dt": dt, "exercises": sys.modules[__package__]})
    return ns
