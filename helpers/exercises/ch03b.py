"""Exercises of chapter 03b (deadlocks and lock conflicts): transfers that cannot deadlock, a job that runs once.

Each judge works in this kernel's scratch schema (``lab_schema(engine, "ex03b")``, dropped in a
``finally``). The transfers are interleaved as chapter 03a's exercises are (``_Interleaving``: a
worker's ``between()`` returns once the other has reached it, has finished, or waits for a lock), so a
deadlock, when the answer allows one, happens on every run. The singleton judge reads ``pg_locks``
after its connections went back to their pool. A judge measures SQLSTATEs, rows, job runs and locks
held, never a timing.
"""

from __future__ import annotations

import threading

from sqlalchemy import create_engine, text

from ..config import WorkbookError
from ..retrying import sqlstate
from ..scratch import drop_lab_schema, scratch_name
from ..waits import bounded
from . import exercise
from .ch03a import _BOUND_S, _PATH, _Interleaving, _namespace, _scratch

# ----------------------------------------------------------------------------- exercise 1: no deadlock
TRANSFERS = [(1, 2, 10), (2, 1, 20)]  # (src, dst, amount): opposite directions, at once
EXPECTED = {1: 110, 2: 90}  # from 100 and 100


def _transfer(engine, schema, answer, inter: _Interleaving, i: int, outcome: dict) -> None:
    src, dst, amount = TRANSFERS[i]
    try:
        with engine.connect() as conn:
            # lock_timeout well above deadlock_timeout (1 s): a deadlock ends as 40P01, found by the server
            with conn.begin(), bounded(conn, f"transfer {i + 1}", lock_timeout="5s"):
                conn.execute(_PATH, {"s": schema})
                inter.pids[i] = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                answer(conn, src, dst, amount, lambda: inter.between(i))
        outcome[i] = "committed"
    except Exception as exc:  # noqa: BLE001 - the verdict reports it
        outcome[i] = sqlstate(exc) or type(exc).__name__
    finally:
        with inter.lock:
            inter.finished.add(i)


def solution_transfer(conn, src, dst, amount, between):
    """Lock both rows in one global order (lowest id first) before changing either: the other transfer waits."""
    conn.execute(text("SELECT id FROM accounts WHERE id IN (:a, :b) ORDER BY id FOR UPDATE"), {"a": src, "b": dst})
    between()
    conn.execute(text("UPDATE accounts SET balance = balance - :a WHERE id = :id"), {"a": amount, "id": src})
    conn.execute(text("UPDATE accounts SET balance = balance + :a WHERE id = :id"), {"a": amount, "id": dst})


def wrong_transfer(conn, src, dst, amount, between):
    """Plausible but wrong: each row locked FOR UPDATE, but in the transfer's order: still a cycle."""
    conn.execute(text("SELECT id FROM accounts WHERE id = :id FOR UPDATE"), {"id": src})
    between()
    conn.execute(text("SELECT id FROM accounts WHERE id = :id FOR UPDATE"), {"id": dst})
    conn.execute(text("UPDATE accounts SET balance = balance - :a WHERE id = :id"), {"a": amount, "id": src})
    conn.execute(text("UPDATE accounts SET balance = balance + :a WHERE id = :id"), {"a": amount, "id": dst})


@exercise(
    "03b",
    "locking_transfer_no_deadlock",
    "Transfers that cannot deadlock",
    solution=solution_transfer,
    wrong=wrong_transfer,
    hint="lock both rows in one global order before changing either, whatever the direction of the transfer: "
    "SELECT id FROM accounts WHERE id IN (:src, :dst) ORDER BY id FOR UPDATE",
    namespace=_namespace,
)
def judge_transfer(answer, engine):
    schema = _scratch(
        engine,
        [
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)",
            "INSERT INTO accounts VALUES (1, 100), (2, 100)",
        ],
        name="ex03b",
    )
    try:
        inter, outcome = _Interleaving(engine, 2), {}
        threads = [
            threading.Thread(target=_transfer, args=(engine, schema, answer, inter, i, outcome)) for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3 * _BOUND_S)
        with engine.begin() as conn:
            conn.execute(_PATH, {"s": schema})
            balances = dict(conn.execute(text("SELECT id, balance FROM accounts ORDER BY id")).all())
    finally:
        drop_lab_schema(engine, schema)
    failed = sorted(v for v in outcome.values() if v != "committed")
    measured = {"balances": balances, "failed": failed}
    if failed:
        what = " (40P01: a deadlock, the server rolled one transfer back)" if "40P01" in failed else ""
        return False, f"a transfer failed: {', '.join(failed)}{what}; both should commit", measured
    if balances != EXPECTED:
        return False, f"both transfers committed but the balances are {balances}, not {EXPECTED}", measured
    return True, f"both transfers committed, one waiting for the other: balances {balances}", measured


# ----------------------------------------------------------------------------- exercise 2: a singleton job
APP_SERVERS = 3
# a bigint key shows in pg_locks as two 32-bit halves (classid high, objid low); objsubid 1 marks a bigint key.
# The key is cast to bigint first: a small int binds as int4, and int4 >> 32 shifts by 0, not 32.
_HELD = text(
    "SELECT count(*) FROM pg_locks, CAST(:k AS bigint) AS k WHERE locktype = 'advisory' AND objsubid = 1"
    " AND classid = CAST(k >> 32 AS oid) AND objid = CAST(k & 4294967295 AS oid)"
)


def solution_run_once(conn, key, job):
    """A transaction-level advisory lock: one app server gets it, and it ends with the transaction."""
    if conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar_one():
        job()
        return True
    return False


def wrong_run_once(conn, key, job):
    """Plausible but wrong: the session-level lock elects one runner, and stays on the pooled connection."""
    if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
        job()
        return True
    return False


@exercise(
    "03b",
    "locking_singleton_job",
    "A nightly job that runs once",
    solution=solution_run_once,
    wrong=wrong_run_once,
    hint="take the lock with pg_try_advisory_xact_lock(:key): one app server gets it, the others get false at once, "
    "and it ends with the transaction (a session-level pg_try_advisory_lock stays with the pooled connection "
    "unless you pg_advisory_unlock it in a finally)",
    namespace=_namespace,
)
def judge_singleton(answer, engine):
    schema = _scratch(engine, [], name="ex03b")  # its OID is the advisory key: no other kernel uses it now
    # the pool of the app servers: closing a connection returns it (rolled back, still open)
    pool = create_engine(
        engine.url,
        pool_size=APP_SERVERS,
        max_overflow=0,
        connect_args={"application_name": scratch_name("wb_ex03b_app")},
    )
    conns, ran, returned, problems = [], [], {}, []

    def start(i: int) -> None:
        """App server i starts the job on a connection of its pool, in a transaction it keeps open."""
        conn = pool.connect()
        conns.append(conn)
        conn.begin()

        def job() -> None:
            ran.append(i + 1)
            if i + 1 < APP_SERVERS:  # the next app server starts while this one's job is still running
                start(i + 1)

        try:
            with bounded(conn, f"app server {i + 1}'s start", lock_timeout="1s"):
                returned[i + 1] = answer(conn, key, job)
        except WorkbookError:
            problems.append(f"app server {i + 1} waited for another one's lock until lock_timeout")
        if i + 1 < APP_SERVERS and len(conns) == i + 1:  # it did not run the job: the next one starts now
            start(i + 1)

    try:
        with engine.connect() as conn:
            key = conn.execute(text("SELECT to_regnamespace(:s)::oid::bigint"), {"s": schema}).scalar_one()
        start(0)
        for conn in conns:
            if conn.in_transaction():
                conn.rollback() if problems else conn.commit()
            conn.close()  # back to the pool: reset on return (ROLLBACK), the connection stays open
        with engine.connect() as conn:
            held = conn.execute(_HELD, {"k": key}).scalar_one()
    finally:
        for conn in conns:
            conn.close()
        pool.dispose()  # closes the pooled connections: whatever they still held goes with them
        drop_lab_schema(engine, schema)
    returned = [returned.get(i + 1) for i in range(APP_SERVERS)]
    measured = {"ran": ran, "returned": returned, "locks_left": held, "problems": problems}
    if problems:
        return False, problems[0], measured
    if len(ran) != 1:
        return False, f"the job ran {len(ran)} times for {APP_SERVERS} app servers: it must run once", measured
    if [bool(r) for r in returned] != [i + 1 in ran for i in range(APP_SERVERS)]:
        return False, f"run_once returned {returned}: it should say whether it ran the job", measured
    if held:
        return (
            False,
            "the job ran once, but its advisory lock is still held after the transactions ended and the "
            "connections went back to the pool: the next night, no other app server could run it",
            measured,
        )
    return True, f"app server {ran[0]} ran the job, the others returned at once, and no lock stayed behind", measured
