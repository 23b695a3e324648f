"""Exercises of chapter 09 (monitoring): find statements of a workload in pg_stat_statements.

The judge runs a small workload in a database of this kernel's own (``empty_database``, dropped in a
``finally``), so nobody else's statements share its ``dbid``:

- a page of 30 posts with each author loaded by its own lookup, twice: the lookup is called 60 times
  (the N+1), the listing twice;
- a report that is slow by construction (it sleeps 0.3 s on the server), run once;
- three full reads of the posts table (the most rows).

The learner's function gets a connection (to the workbook database, where the view lives) and the
workload database's oid, and returns a ``queryid``. The judge names the statement that queryid stands
for. The call counts are exact; the slow report's total time beats the 60 lookups' by two orders of
magnitude (0.3 s against well under 10 ms), a margin no shared machine closes.

Where pg_stat_statements (or CREATEDB) is missing, the judge returns a failed verdict saying so, with
``measured["missing"]`` set (the tests skip then), and never raises.
"""

from __future__ import annotations

import psycopg
from sqlalchemy import Engine, text

from .registry import exercise

PAGE = 30  # posts per page: one lookup per post's author
PAGES = 2
SLEEP_S = 0.3
LOOKUP = "SELECT name FROM authors WHERE id = $1"
REPORT = "pg_sleep"  # the slow report's text contains it


def _workload(engine: Engine) -> tuple[int, dict] | tuple[None, dict]:
    """Run the workload in a fresh database of our own; (its oid, its statements: text -> calls / total_ms)."""
    from ..capability import missing
    from ..database import psycopg_conninfo
    from ..scratchdb import empty_database

    for need in ("pg_stat_statements", "createdb"):
        if reason := missing(need, engine):
            return None, {"missing": need, "reason": reason}
    eng = empty_database("ex09_pgss")
    try:
        name = eng.url.database
        with psycopg.connect(**psycopg_conninfo(name), autocommit=True) as conn:  # no BEGIN/COMMIT entries
            conn.execute("CREATE TABLE authors (id int PRIMARY KEY, name text NOT NULL)")
            conn.execute("CREATE TABLE posts (id int PRIMARY KEY, author_id int NOT NULL, title text NOT NULL)")
            conn.execute("INSERT INTO authors SELECT g, 'author ' || g FROM generate_series(1, 50) g")
            conn.execute("INSERT INTO posts SELECT g, 1 + g % 50, 'post ' || g FROM generate_series(1, 200) g")
            for _ in range(PAGES):  # the N+1: one listing, then one lookup per post
                page = conn.execute("SELECT id, author_id FROM posts ORDER BY id DESC LIMIT %s", (PAGE,)).fetchall()
                for _post, author in page:
                    conn.execute("SELECT name FROM authors WHERE id = %s", (author,)).fetchone()
            conn.execute("SELECT count(*) FROM posts CROSS JOIN pg_sleep(%s)", (SLEEP_S,)).fetchone()  # the report
            for _ in range(3):
                conn.execute("SELECT * FROM posts").fetchall()
            dbid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT queryid, regexp_replace(query, '\\s+', ' ', 'g') AS query, calls, total_exec_time "
                    "FROM pg_stat_statements WHERE dbid = :dbid"
                ),
                {"dbid": dbid},
            ).all()
    finally:
        eng.dispose()
        from ..scratchdb import drop_database

        drop_database("ex09_pgss")
    return dbid, {
        int(r.queryid): {"query": r.query, "calls": int(r.calls), "total_ms": float(r.total_exec_time)} for r in rows
    }


def _judge(want: str, what: str):
    def judge(answer, engine: Engine):
        dbid, stmts = _workload(engine)
        if dbid is None:
            return False, f"cannot judge here: {stmts['missing']} is not available ({stmts['reason']})", stmts
        with engine.connect() as conn:
            got = answer(conn, dbid)
            conn.rollback()
        right = [
            q for q, s in stmts.items() if s["query"].startswith(want) or (want == REPORT and REPORT in s["query"])
        ]
        lookup = sum(s["calls"] for s in stmts.values() if s["query"] == LOOKUP)
        measured = {"lookup_calls": lookup, "expected": stmts[right[0]]["query"] if right else None}
        if got is None or not isinstance(got, int):
            measured["answer"] = repr(got)[:60]
            return False, f"the function returned {measured['answer']}, not a queryid (an integer)", measured
        if int(got) not in stmts:
            measured["answer"] = "not a statement of this database"
            return False, "that queryid is not one of the workload database's statements: filter by dbid", measured
        measured["answer"] = stmts[int(got)]["query"]
        if int(got) not in right:
            return False, f"you found {measured['answer'][:70]!r}, which is not {what}", measured
        return True, f"right: {measured['answer'][:70]!r} is {what}.", measured

    return judge


# ----------------------------------------------------------------------------- exercise 1: the N+1
def solution_most_called(conn, dbid):
    """The most calls in the workload's database: the N+1's lookup."""
    query = text("SELECT queryid FROM pg_stat_statements WHERE dbid = :dbid ORDER BY calls DESC LIMIT 1")
    return conn.execute(query, {"dbid": dbid}).scalar()


def wrong_most_called(conn, dbid):
    """Plausible but wrong: the top of the bill by total time is the slow report, not the most frequent."""
    query = text("SELECT queryid FROM pg_stat_statements WHERE dbid = :dbid ORDER BY total_exec_time DESC LIMIT 1")
    return conn.execute(query, {"dbid": dbid}).scalar()


exercise(
    "09",
    "monitoring_most_called",
    "Find the N+1: the statement called most often, from pg_stat_statements",
    solution=solution_most_called,
    wrong=wrong_most_called,
    hint="an N+1 is cheap per call and frequent: sort this database's entries by the calls column",
    namespace=lambda: names(),
)(_judge(LOOKUP, "the statement called most often (the N+1's lookup)"))


# ----------------------------------------------------------------------------- exercise 2: the slowest
def solution_slowest_total(conn, dbid):
    """The most total execution time in the workload's database: where the server spends its time."""
    query = text("SELECT queryid FROM pg_stat_statements WHERE dbid = :dbid ORDER BY total_exec_time DESC LIMIT 1")
    return conn.execute(query, {"dbid": dbid}).scalar()


def wrong_slowest_total(conn, dbid):
    """Plausible but wrong: the most frequent statement is not the one that costs the most in total."""
    query = text("SELECT queryid FROM pg_stat_statements WHERE dbid = :dbid ORDER BY calls DESC LIMIT 1")
    return conn.execute(query, {"dbid": dbid}).scalar()


exercise(
    "09",
    "monitoring_slowest_total",
    "Find the statement that costs the server the most time in total",
    solution=solution_slowest_total,
    wrong=wrong_slowest_total,
    hint="total time is calls x mean: sort this database's entries by total_exec_time, not by calls",
    namespace=lambda: names(),
)(_judge(REPORT, "the statement with the most total execution time (the slow report)"))


def names() -> dict:
    """The names a starter cell may use (what chapter 09 imported)."""
    import sys

    return {"text": text, "exercises": sys.modules[__package__]}
