"""Exercises of chapter 02b (joins, statistics and query shapes): checkers that count on the server.

Each judge builds its own small tables in a scratch schema of this process (``lab_schema``), runs
the learner's answer against them and drops the schema in a ``finally``. It judges what does not
vary between runs: sequential scans counted by ``pg_stat_user_tables``, the plan's scan and join
nodes, and the rows returned; never a timing.
"""

from __future__ import annotations

import sys

from sqlalchemy import Column, Engine, Integer, MetaData, Table, and_, exists, not_, select, text
from sqlalchemy.pool import NullPool

from ..database import make_engine
from ..plans import explain
from ..scratch import drop_lab_schema, lab_schema
from ..waits import bounded
from . import exercise

#: exercise 1: the two tables of the unindexed foreign key, and the users deleted
FK_USERS = 2_000
FK_COMMENTS = 100_000
FK_DELETE = {"lo": 1001, "hi": 1020}
FK_READ = {"u": 7}
#: exercise 2: the accounts, their events (some without an account) and the kind asked about
ANTI_ACCOUNTS = 1_000
ANTI_EVENTS = 20_000
ANTI_KIND = 9


def _lab_engine(schema: str) -> Engine:
    """An engine whose sessions see ``schema`` first (the learner's SQL names its tables bare)."""
    options = "-c search_path=" + schema + ",public -c max_parallel_workers_per_gather=0"
    return make_engine(poolclass=NullPool, connect_args={"options": options, "application_name": schema})


# ----------------------------------------------------------------------------- exercise 1: the foreign key's index
def solution_fk_index() -> list[str]:
    """Index the referencing column: the cascade's lookups and the reads by user both seek it."""
    return ["CREATE INDEX ix_comments_fk_user_id ON comments_fk (user_id)", "ANALYZE comments_fk"]


def wrong_fk_index() -> list[str]:
    """Plausible but wrong: an index on the referenced side, which its primary key already indexes."""
    return ["CREATE INDEX ix_users_fk_id_name ON users_fk (id, name)", "ANALYZE users_fk"]


def _build_fk(conn) -> None:
    conn.execute(
        text("CREATE TABLE users_fk (id int PRIMARY KEY, name text NOT NULL) WITH (autovacuum_enabled = false)")
    )
    conn.execute(
        text(
            "CREATE TABLE comments_fk (id int PRIMARY KEY, "
            "user_id int NOT NULL REFERENCES users_fk (id) ON DELETE CASCADE, body text NOT NULL) "
            "WITH (autovacuum_enabled = false)"
        )
    )
    conn.execute(text("INSERT INTO users_fk SELECT g, 'user ' || g FROM generate_series(1, :n) AS g"), {"n": FK_USERS})
    conn.execute(
        text(
            "INSERT INTO comments_fk SELECT g, 1 + (hashint8(g) & 1048575) % :users, rpad('comment ' || g, 60, '.') "
            "FROM generate_series(1, :n) AS g"
        ),
        {"users": FK_USERS, "n": FK_COMMENTS},
    )
    conn.execute(text("ANALYZE users_fk, comments_fk"))


def _seq_scans(conn) -> int:
    """Sequential scans of comments_fk so far: this backend's counters flushed, read in a fresh snapshot."""
    conn.execute(text("SELECT pg_stat_force_next_flush()"))
    conn.commit()
    n = conn.execute(
        text("SELECT seq_scan FROM pg_stat_user_tables WHERE relid = to_regclass(:t)"), {"t": "comments_fk"}
    ).scalar()
    conn.commit()
    return int(n)


def judge_fk_index(answer, engine: Engine):
    statements = list(answer())
    schema = lab_schema(engine, "ex02_fk")
    lab = _lab_engine(schema)
    try:
        with lab.begin() as conn, bounded(conn, "building the exercise's tables"):
            _build_fk(conn)
        with (
            lab.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
            bounded(conn, "your DDL on the exercise's tables", session=True),
        ):
            for stmt in statements:  # the learner's DDL (outside a transaction: VACUUM or CONCURRENTLY may come)
                conn.execute(text(stmt))
        read = explain("SELECT id, body FROM comments_fk WHERE user_id = :u", FK_READ, engine=lab)
        with lab.connect() as conn, bounded(conn, "the cascading DELETE", session=True):
            before = _seq_scans(conn)
            deleted = conn.execute(text("DELETE FROM users_fk WHERE id BETWEEN :lo AND :hi"), FK_DELETE).rowcount
            conn.commit()
            after = _seq_scans(conn)
    finally:
        lab.dispose()
        drop_lab_schema(engine, schema)
    scan = read.scans.iloc[0]
    indexes = sorted({str(i) for i in read.nodes["index"].dropna()})  # a bitmap scan names it on its child
    measured = {
        "users_deleted": deleted,
        "comments_seq_scans_during_delete": after - before,
        "read_node": scan["node_type"],
        "read_indexes": indexes,
    }
    problems = []
    if after - before:
        problems.append(
            f"deleting {deleted} users scanned comments_fk sequentially {after - before} times "
            "(the ON DELETE CASCADE trigger, once per user)"
        )
    if scan["node_type"] == "Seq Scan" or not indexes:
        problems.append(f"one user's comments are read with a {scan['node_type']} of comments_fk, not an index")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return (
        True,
        f"{deleted} users deleted with no sequential scan of comments_fk; one user's comments through "
        f"{', '.join(indexes)} ({scan['node_type']}).",
        measured,
    )


exercise(
    "02b",
    "explain_fk_index",
    "An ON DELETE CASCADE of 20 users without one sequential scan of the referencing table",
    solution=solution_fk_index,
    wrong=wrong_fk_index,
    hint="PostgreSQL indexes the referenced side of a foreign key (its primary key), not the referencing "
    "column: comments_fk.user_id needs an index of its own.",
)(judge_fk_index)


# ----------------------------------------------------------------------------- exercise 2: NOT EXISTS, an anti-join
def solution_quiet_accounts(accounts, events):
    """NOT EXISTS asks only whether a matching row exists: NULLs change nothing, and it plans as an anti-join."""
    kind_9 = select(events.c.id).where(events.c.account_id == accounts.c.id, events.c.kind == ANTI_KIND)
    return select(accounts.c.id).where(~kind_9.exists())


def wrong_quiet_accounts(accounts, events):
    """Plausible but wrong: accounts with some event that is not of kind 9, which is another question."""
    return select(accounts.c.id).join(events, events.c.account_id == accounts.c.id).where(events.c.kind != 9).distinct()


def _anti_tables(schema: str) -> tuple[Table, Table]:
    meta = MetaData(schema=schema)
    accounts = Table("accounts", meta, Column("id", Integer, primary_key=True))
    events = Table(
        "events",
        meta,
        Column("id", Integer, primary_key=True),
        Column("account_id", Integer, nullable=True),
        Column("kind", Integer, nullable=False),
    )
    return accounts, events


def judge_quiet_accounts(answer, engine: Engine):
    schema = lab_schema(engine, "ex02_anti")
    accounts, events = _anti_tables(schema)
    try:
        with engine.begin() as conn, bounded(conn, "building the exercise's tables"):
            conn.execute(text("SELECT set_config('search_path', :s, true)"), {"s": schema + ",public"})
            accounts.metadata.create_all(conn)
            conn.execute(text("INSERT INTO accounts SELECT g FROM generate_series(1, :n) AS g"), {"n": ANTI_ACCOUNTS})
            conn.execute(  # every 500th event, of kind 9, has no account
                text(
                    "INSERT INTO events SELECT g, CASE WHEN g % 500 = 9 THEN NULL "
                    "ELSE 1 + (hashint8(g) & 1048575) % :accounts END, g % 10 FROM generate_series(1, :n) AS g"
                ),
                {"accounts": ANTI_ACCOUNTS, "n": ANTI_EVENTS},
            )
            conn.execute(text("ANALYZE accounts, events"))
        stmt = answer(accounts, events)
        with engine.begin() as conn:
            plan = explain(stmt, engine=conn)
            got = sorted(r[0] for r in conn.execute(stmt))
            expected = sorted(r[0] for r in conn.execute(solution_quiet_accounts(accounts, events)))
    finally:
        drop_lab_schema(engine, schema)
    join_types = sorted({str(j) for j in plan.nodes["join_type"].dropna()})
    anti = any("Anti" in j for j in join_types)  # "Anti", or "Right Anti" on 16+
    measured = {"rows": len(got), "expected_rows": len(expected), "same_rows": got == expected, "anti_join": anti}
    problems = []
    if got != expected:
        problems.append(f"{len(got)} accounts returned, {len(expected)} expected (those with no event of kind 9)")
    if not anti:
        problems.append(f"the plan has no anti-join (join types: {', '.join(join_types) or 'none'})")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, f"{len(got)} accounts, planned as an anti-join ({', '.join(join_types)}).", measured


exercise(
    "02b",
    "explain_anti_join",
    "The accounts with no event of kind 9, with NULLs in the subquery, as an anti-join",
    solution=solution_quiet_accounts,
    wrong=wrong_quiet_accounts,
    hint="ask whether a matching event exists: NOT EXISTS (~select(...).exists()) is an anti-join, and unlike "
    "NOT IN it returns rows even when the subquery yields a NULL.",
    namespace=lambda: names(),
)(judge_quiet_accounts)


def names() -> dict:
    """The names a starter cell may use (what the notebook imported)."""
    ns = {"select": select, "exists": exists, "not_": not_, "and_": and_, "text": text}
    ns.update({"exercises": sys.modules[__package__]})
    return ns
