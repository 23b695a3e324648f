"""Exercises of chapter 06 (zero-downtime migrations): write the safe migration, judged by the DDL observatory.

The learner's answer is a function returning the migration as a list of SQL statements, in order.
The judge runs them on a table of its own (in a scratch schema of this kernel, first on the
search_path, so a statement names the table unqualified), each statement in its own transaction
(a statement with CONCURRENTLY on autocommit, observed while it waits for an open writer), and
measures per statement with ``helpers.lockwatch.observe_steps``: the strongest lock held on the
table, whether the table was scanned (``pg_stat_xact_user_tables``, index builds included) and
whether it was rewritten (``relfilenode``). It passes an answer that reaches the end state and
never scans or rewrites the table while holding a lock that stops writers (``SHARE`` or
stronger). Locks, scans and rewrites do not vary between runs: the verdict is the same twice.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import sql
from sqlalchemy import Engine, text

from ..lockwatch import app_conninfo, observe_steps
from ..scratch import drop_lab_schema, lab_schema
from .registry import exercise

ROWS = 5_000  # rows of the exercise's table: every value filled, every value distinct


def _make_table(engine: Engine, base: str, table: str) -> str:
    """A scratch schema of this kernel holding ``table`` (id int PRIMARY KEY, email text), ROWS rows."""
    import psycopg

    schema = lab_schema(engine, base)
    with psycopg.connect(**app_conninfo(engine, "wb_exercise"), autocommit=True) as conn:
        t = sql.Identifier(schema, table)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, email text)").format(t))
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'user' || g || '@example.com' FROM generate_series(1, %s) g").format(t),
            (ROWS,),
        )
        conn.execute(sql.SQL("ANALYZE {}").format(t))
    return schema


def _steps_of(answer: Callable[[], list]) -> list[str]:
    steps = answer()
    if not isinstance(steps, list | tuple) or not all(isinstance(s, str) for s in steps):
        raise TypeError("the function should return a list of SQL statements (strings)")
    return list(steps)


def _judge_steps(engine: Engine, schema: str, table: str, steps: list[str]) -> tuple[str | None, dict]:
    """Run and measure ``steps``; (what went wrong or None, what was measured)."""
    df = observe_steps(engine, schema, table, steps)
    measured = {
        "steps": [
            {"lock": r.lock, "scanned": r.scanned, "rewrote": bool(r.rewrote), "sqlstate": r.sqlstate}
            for r in df.itertuples()
        ]
    }
    for n, r in enumerate(df.itertuples(), 1):
        if r.sqlstate:
            return f"statement {n} failed ({r.sqlstate}: {r.error})", measured
        if r.rewrote:
            return f"statement {n} ({r.step!r}) rewrote the whole table under {r.lock}", measured
        if r.scanned and r.blocks_writes:
            return f"statement {n} ({r.step!r}) read the whole table while holding {r.lock}: writers waited", measured
    return None, measured


# ----------------------------------------------------------------------------- exercise 1: NOT NULL
def solution_not_null() -> list[str]:
    """Prove NOT NULL with a CHECK first (validated without blocking writes); SET NOT NULL then uses it, no scan."""
    return [
        "ALTER TABLE tickets ADD CONSTRAINT tickets_email_nn CHECK (email IS NOT NULL) NOT VALID",
        "ALTER TABLE tickets VALIDATE CONSTRAINT tickets_email_nn",
        "ALTER TABLE tickets ALTER COLUMN email SET NOT NULL",
        "ALTER TABLE tickets DROP CONSTRAINT tickets_email_nn",
    ]


def wrong_not_null() -> list[str]:
    """Plausible but unsafe: one statement, which scans the table under ACCESS EXCLUSIVE."""
    return ["ALTER TABLE tickets ALTER COLUMN email SET NOT NULL"]


@exercise(
    "06",
    "migrations_not_null_safely",
    "Make tickets.email NOT NULL without stopping writers",
    solution=solution_not_null,
    wrong=wrong_not_null,
    hint=(
        "SET NOT NULL alone reads every row under ACCESS EXCLUSIVE. First ADD CONSTRAINT ... CHECK (email IS "
        "NOT NULL) NOT VALID (no scan), then VALIDATE CONSTRAINT (scans under SHARE UPDATE EXCLUSIVE: writes go "
        "on), then SET NOT NULL, which trusts the valid check instead of scanning; drop the check at the end"
    ),
)
def judge_not_null(answer: Callable[[], list], engine: Engine):
    steps = _steps_of(answer)
    schema = _make_table(engine, "ex06_nn", "tickets")
    try:
        problem, measured = _judge_steps(engine, schema, "tickets", steps)
        with engine.connect() as conn:
            not_null = conn.execute(
                text("SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(:t) AND attname = 'email'"),
                {"t": f"{schema}.tickets"},
            ).scalar()
        measured["email_not_null"] = bool(not_null)
    finally:
        drop_lab_schema(engine, schema)
    if problem:
        return False, problem, measured
    if not not_null:
        return False, f"after your {len(steps)} statement(s), tickets.email still accepts NULL", measured
    return (
        True,
        f"tickets.email is NOT NULL, and none of your {len(steps)} statements scanned under a write lock",
        measured,
    )


# ----------------------------------------------------------------------------- exercise 2: UNIQUE
def solution_unique() -> list[str]:
    """Build the unique index concurrently (writes go on), then adopt it as the constraint (no scan)."""
    return [
        "CREATE UNIQUE INDEX CONCURRENTLY members_email_key ON members (email)",
        "ALTER TABLE members ADD CONSTRAINT members_email_key UNIQUE USING INDEX members_email_key",
    ]


def wrong_unique() -> list[str]:
    """Plausible but unsafe: the index built without CONCURRENTLY holds SHARE (writes wait) while it reads the table."""
    return [
        "CREATE UNIQUE INDEX members_email_key ON members (email)",
        "ALTER TABLE members ADD CONSTRAINT members_email_key UNIQUE USING INDEX members_email_key",
    ]


@exercise(
    "06",
    "migrations_unique_safely",
    "Add a UNIQUE constraint on members.email without stopping writers",
    solution=solution_unique,
    wrong=wrong_unique,
    hint=(
        "ADD CONSTRAINT ... UNIQUE (email) and a plain CREATE UNIQUE INDEX both read the whole table while "
        "writers wait. Build the index with CREATE UNIQUE INDEX CONCURRENTLY (its own statement, no transaction), "
        "then ALTER TABLE members ADD CONSTRAINT members_email_key UNIQUE USING INDEX members_email_key"
    ),
)
def judge_unique(answer: Callable[[], list], engine: Engine):
    steps = _steps_of(answer)
    schema = _make_table(engine, "ex06_uq", "members")
    try:
        problem, measured = _judge_steps(engine, schema, "members", steps)
        with engine.connect() as conn:
            unique = conn.execute(
                text(
                    "SELECT count(*) FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid "
                    "AND a.attnum = ALL (c.conkey) WHERE c.conrelid = to_regclass(:t) AND c.contype = 'u' "
                    "AND a.attname = 'email' AND cardinality(c.conkey) = 1"
                ),
                {"t": f"{schema}.members"},
            ).scalar()
            invalid = conn.execute(
                text("SELECT count(*) FROM pg_index WHERE indrelid = to_regclass(:t) AND NOT indisvalid"),
                {"t": f"{schema}.members"},
            ).scalar()
        measured.update(unique_constraint=bool(unique), invalid_indexes=int(invalid))
    finally:
        drop_lab_schema(engine, schema)
    if problem:
        return False, problem, measured
    if not unique:
        return False, "members has no UNIQUE constraint on email (a unique index alone is not a constraint)", measured
    if invalid:
        return False, f"{invalid} INVALID index(es) left behind on members", measured
    return True, "members.email is UNIQUE, and no statement read the table while writers had to wait", measured
