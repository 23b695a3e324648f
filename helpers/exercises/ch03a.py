"""Exercises of chapter 03a (transactions and lost updates): the learner's transaction code, run in several sessions.

Each judge works in this kernel's scratch schema (``lab_schema(engine, "ex03")``, dropped in a
``finally``); the learner's SQL names its tables bare (``items``, ``jobs``), as the judge's
transactions put ``search_path`` on that schema. The interleaving is forced without a timer: a
worker's ``between()`` returns only once every other worker has reached it too, has finished, or is
waiting for a lock (``pg_blocking_pids``), as the chapter's ``Scenario`` scheduler decides; chapter 03b's exercises
force theirs with the same ``_Interleaving``. A judge measures rows and SQLSTATEs, never a timing.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from ..config import WorkbookError
from ..retrying import sqlstate
from ..scratch import drop_lab_schema
from ..seed import lab_schema
from ..waits import bounded
from . import exercise

_PATH = text("SELECT set_config('search_path', :s, true)")
_BOUND_S = 15.0  # no forced interleaving waits longer: the judge fails instead of hanging


def _namespace() -> dict:
    return {"text": text}


def _scratch(engine, statements: list[str], name: str = "ex03") -> str:
    schema = lab_schema(engine, name)
    with engine.begin() as conn, bounded(conn, "creating the exercise's table"):
        conn.execute(_PATH, {"s": schema})
        for stmt in statements:
            conn.execute(text(stmt))
    return schema


# ----------------------------------------------------------------------------- exercise 1: lost update
class _Interleaving:
    """``between(i)`` for worker i: returns once each other worker has arrived, finished, or waits for a lock."""

    def __init__(self, engine, workers: int):
        self.engine, self.n = engine, workers
        self.pids: dict[int, int] = {}
        self.arrived: set[int] = set()
        self.finished: set[int] = set()
        self.lock = threading.Lock()

    def between(self, i: int) -> None:
        with self.lock:
            self.arrived.add(i)
        deadline = time.monotonic() + _BOUND_S
        with self.engine.connect() as watch:
            while True:
                with self.lock:
                    others = [j for j in range(self.n) if j != i and j not in self.arrived | self.finished]
                    pids = [self.pids[j] for j in others if j in self.pids]
                if not others:
                    return
                if len(pids) == len(others):
                    blocked = watch.execute(
                        text(
                            "SELECT count(*) FROM unnest(CAST(:p AS int[])) AS p WHERE cardinality(pg_blocking_pids(p)) > 0"
                        ),
                        {"p": pids},
                    ).scalar_one()
                    if blocked == len(others):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError("the other session neither reached between() nor waited for a lock")
                time.sleep(0.002)  # polling the server's answer, not deciding by a timer


def _sale(engine, schema, answer, inter: _Interleaving, i: int, outcome: dict) -> None:
    try:
        with engine.connect() as conn:
            with conn.begin(), bounded(conn, f"sale {i + 1}", lock_timeout="5s"):
                conn.execute(_PATH, {"s": schema})
                inter.pids[i] = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                answer(conn, lambda: inter.between(i))
        outcome[i] = "committed"
    except Exception as exc:  # noqa: BLE001 - the verdict reports it
        outcome[i] = sqlstate(exc) or type(exc).__name__
    finally:
        with inter.lock:
            inter.finished.add(i)


def solution_sell(conn, between):
    """Let the database do the arithmetic: the second UPDATE waits for the first and then decrements its result."""
    between()
    conn.execute(text("UPDATE items SET stock = stock - 1 WHERE id = 1"))


def wrong_sell(conn, between):
    """Plausible but wrong: FOR SHARE lets both read, and then each waits for the other's share lock: a deadlock."""
    stock = conn.execute(text("SELECT stock FROM items WHERE id = 1 FOR SHARE")).scalar_one()
    between()
    conn.execute(text("UPDATE items SET stock = :s WHERE id = 1"), {"s": stock - 1})


@exercise(
    "03a",
    "locking_no_lost_update",
    "No lost update under a forced interleaving",
    solution=solution_sell,
    wrong=wrong_sell,
    hint="either let the database compute (UPDATE items SET stock = stock - 1), or lock the row you read with "
    "SELECT ... FOR UPDATE (not FOR SHARE: two share locks deadlock when both sessions then write)",
    namespace=_namespace,
)
def judge_no_lost_update(answer, engine):
    schema = _scratch(
        engine, ["CREATE TABLE items (id int PRIMARY KEY, stock int NOT NULL)", "INSERT INTO items VALUES (1, 10)"]
    )
    try:
        inter, outcome = _Interleaving(engine, 2), {}
        threads = [threading.Thread(target=_sale, args=(engine, schema, answer, inter, i, outcome)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3 * _BOUND_S)
        with engine.begin() as conn:
            conn.execute(_PATH, {"s": schema})
            stock = conn.execute(text("SELECT stock FROM items WHERE id = 1")).scalar_one()
    finally:
        drop_lab_schema(engine, schema)
    failed = sorted(v for v in outcome.values() if v != "committed")
    measured = {"final_stock": stock, "failed": failed}
    if failed:
        return False, f"a sale failed ({', '.join(failed)}): both sales should commit", measured
    if stock != 8:
        return False, f"two sales committed but the stock went from 10 to {stock}: a sale was lost", measured
    return True, "two sales, stock 10 -> 8: no update lost", measured


# ----------------------------------------------------------------------------- exercise 2: claim a job
def solution_claim(conn):
    """Take the first queued job nobody holds: FOR UPDATE SKIP LOCKED, then mark it."""
    job = conn.execute(
        text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
    ).scalar()
    if job is not None:
        conn.execute(text("UPDATE jobs SET status = 'taken' WHERE id = :id"), {"id": job})
    return job


def wrong_claim(conn):
    """Plausible but wrong: FOR UPDATE alone makes the second worker wait for the first one's job."""
    job = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE")).scalar()
    if job is not None:
        conn.execute(text("UPDATE jobs SET status = 'taken' WHERE id = :id"), {"id": job})
    return job


@exercise(
    "03a",
    "locking_claim_a_job",
    "Claim a job, never twice",
    solution=solution_claim,
    wrong=wrong_claim,
    hint="lock the job you take and skip the ones other workers hold: SELECT ... FOR UPDATE SKIP LOCKED",
    namespace=_namespace,
)
def judge_claim(answer, engine):
    schema = _scratch(
        engine,
        [
            "CREATE TABLE jobs (id int PRIMARY KEY, status text NOT NULL DEFAULT 'queued')",
            "INSERT INTO jobs (id) SELECT generate_series(1, 5)",
        ],
    )
    conns, claimed, problem = [], [], None
    try:
        for i in range(3):  # three workers, each transaction still open while the next one claims
            conn = engine.connect()
            conns.append(conn)
            conn.begin()
            conn.execute(_PATH, {"s": schema})
            try:
                with bounded(conn, f"worker {i + 1}'s claim", lock_timeout="1s"):
                    claimed.append(answer(conn))
            except WorkbookError:
                problem = f"worker {i + 1} waited for another worker's lock until lock_timeout"
                break
        for conn in conns:
            if conn.in_transaction():
                conn.rollback() if problem else conn.commit()
        with engine.begin() as conn:
            conn.execute(_PATH, {"s": schema})
            taken = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'taken'")).scalar_one()
    finally:
        for conn in conns:
            conn.close()
        drop_lab_schema(engine, schema)
    measured = {"claimed": claimed, "taken": taken, "problem": problem}
    if problem:
        return False, problem, measured
    if len(set(claimed)) != len(claimed) or None in claimed:
        return False, f"the three workers claimed {claimed}: a job was taken twice (or none)", measured
    if taken != 3:
        return False, f"{taken} jobs are marked taken, not 3: mark the job you claim", measured
    return True, f"three workers claimed {claimed} without waiting for each other", measured
