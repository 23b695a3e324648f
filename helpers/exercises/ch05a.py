"""Exercises of chapter 05a (pool basics and sizing): judged by deterministic exhaustion tests on the server.

Each judge opens a pool of its own on the engine's URL (application_name ``wb_pool_ex_...``), holds
its connections with threads that wait on events and barriers (never on a sleep), and counts what
happened: checkouts that hit ``pool_timeout``, backends seen in ``pg_stat_activity``, connections
still checked out while every handler was in its slow work. Nothing depends on a timing: asked
twice, a judge gives the same verdict.
"""

from __future__ import annotations

import math
import threading

from sqlalchemy import Engine, create_engine, exc, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .. import models
from ..scratch import scratch_suffix
from .registry import exercise

#: (statements per second, ms each statement holds its connection): 8 and 4.5 connections busy on average
RATE_CASES = ((200, 40), (30, 150))
POOL_TIMEOUT_S = 0.3  # exercise 1's pool_timeout: no holder ever releases, so only a full pool waits
HANDLERS, HANDLER_POOL = 4, 2  # exercise 2: four handlers share a pool of two
HANDLER_POOL_TIMEOUT_S = 2  # exercise 2: a handler waits this long for another's quick read to end
SLOW_WORK_WAIT_S = 4  # exercise 2: how long a handler waits in its slow work for the other three


def _app(what: str) -> str:
    return f"wb_pool_ex_{what}_{scratch_suffix()}"


def needed(rate_per_s: float, hold_ms: float) -> int:
    """Connections busy at once by Little's law (rate x hold time), rounded up: a fraction of one is a whole one."""
    return math.ceil(rate_per_s * hold_ms / 1000 - 1e-9)


def backends_named(url, app: str) -> int:
    """Backends carrying ``app`` as application_name, counted on a connection of its own."""
    counter = create_engine(url, poolclass=NullPool)
    try:
        with counter.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"), {"a": app}
            ).scalar_one()
    finally:
        counter.dispose()


# ----------------------------------------------------------------------------- exercise 1: size a pool
def solution_pool_settings(rate_per_s: float, hold_ms: float) -> dict:
    """Little's law: connections busy = rate x hold time (in seconds); round up; no overflow beyond it."""
    import math

    return {"pool_size": math.ceil(rate_per_s * hold_ms / 1000), "max_overflow": 0}


def wrong_pool_settings(rate_per_s: float, hold_ms: float) -> dict:
    """Plausible but wrong: Little's law, rounded down (4.5 connections become 4)."""
    return {"pool_size": int(rate_per_s * hold_ms / 1000), "max_overflow": 0}


def hold_at_once(url, pool_size: int, max_overflow: int, holders: int, app: str) -> dict:
    """``holders`` threads each check out a connection and keep it until every one holds one or gave up.

    Returns how many hit ``pool_timeout`` and how many backends the server saw carrying ``app`` meanwhile.
    """
    eng = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args={"application_name": app},
    )
    settled = threading.Semaphore(0)  # one release per holder: it holds a connection, or it gave up
    release = threading.Event()
    timed_out: list[int] = []

    def holder() -> None:
        try:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
                settled.release()
                release.wait(30)
        except exc.TimeoutError:
            timed_out.append(1)
            settled.release()

    threads = [threading.Thread(target=holder, name=f"{app}_{i}") for i in range(holders)]
    try:
        for t in threads:
            t.start()
        for _ in threads:
            if not settled.acquire(timeout=30):
                raise RuntimeError("a holder neither got a connection nor timed out within 30 s")
        backends = backends_named(url, app)
    finally:
        release.set()
        for t in threads:
            t.join(30)
        eng.dispose()
    return {"timed_out": len(timed_out), "backends": backends}


@exercise(
    "05a",
    "pool_size_for_rate",
    "Size a pool for a rate and a hold time",
    solution=solution_pool_settings,
    wrong=wrong_pool_settings,
    hint="Little's law: connections busy = rate x hold time in seconds; round up, since half a connection is a "
    "whole one, and keep the headroom modest: every process's pool counts against max_connections.",
)
def judge_pool_size_for_rate(answer, engine: Engine):
    measured, problems = {}, []
    for rate, hold_ms in RATE_CASES:
        settings = dict(answer(rate, hold_ms))
        unknown = set(settings) - {"pool_size", "max_overflow"}
        if unknown:
            return False, f"return only pool_size and max_overflow, not {sorted(unknown)}.", {}
        size, overflow = int(settings["pool_size"]), int(settings.get("max_overflow", 10))
        holders, capacity = needed(rate, hold_ms), size + overflow
        run = hold_at_once(engine.url, size, overflow, holders, _app("size"))
        case = f"{rate}/s x {hold_ms} ms"
        measured[case] = {"holders": holders, "capacity": capacity, **run}
        if run["timed_out"]:
            problems.append(
                f"{case}: {holders} requests at once, capacity {capacity}: {run['timed_out']} timed out in the pool"
            )
        elif capacity > 2 * holders:
            problems.append(f"{case}: capacity {capacity} is more than twice the {holders} connections busy at once")
    if problems:
        return False, "; ".join(problems) + ".", measured
    return True, "every request got a connection, and no pool is more than twice what its rate needs.", measured


# ----------------------------------------------------------------------------- exercise 2: release before slow work
def solution_handle(engine, slow_work) -> int:
    """Read, leave the ``with`` block (the connection goes back to the pool), then do the slow work."""
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM users")).scalar_one()
    slow_work()
    return n


def wrong_handle(engine, slow_work) -> int:
    """Plausible but wrong: a Session keeps its connection from the first query until it is closed."""
    with Session(engine) as session:
        n = session.scalar(select(func.count()).select_from(models.User))
        slow_work()  # still inside the session: its connection is still checked out
    return n


@exercise(
    "05a",
    "pool_release_before_slow_work",
    f"{HANDLERS} handlers, a pool of {HANDLER_POOL}: release the connection before the slow work",
    solution=solution_handle,
    wrong=wrong_handle,
    hint="a connection (or a Session) is checked out until its with block ends or it is closed: end it "
    "before calling slow_work(), so the other handlers can use it meanwhile.",
    namespace=lambda: {"text": text, "select": select, "func": func, "Session": Session, "models": models},
)
def judge_release_before_slow_work(answer, engine: Engine):
    app = _app("slow")
    eng = create_engine(
        engine.url,
        pool_size=HANDLER_POOL,
        max_overflow=0,
        pool_timeout=HANDLER_POOL_TIMEOUT_S,
        connect_args={"application_name": app},
    )
    all_in_slow_work = threading.Barrier(HANDLERS, timeout=SLOW_WORK_WAIT_S)
    held_during: list[int] = []

    def slow_work() -> None:  # an external call that ends only when all four handlers are in it at once
        all_in_slow_work.wait()
        held_during.append(eng.pool.checkedout())  # every handler is in here now: who still holds a connection?

    outcomes: list[str] = []

    def run() -> None:
        try:
            outcomes.append(f"ok:{answer(eng, slow_work)}")
        except exc.TimeoutError:
            outcomes.append("pool_timeout")
        except threading.BrokenBarrierError:
            outcomes.append("slow_work_never_met")

    try:
        with engine.connect() as conn:
            users = conn.execute(text("SELECT count(*) FROM users")).scalar_one()
        threads = [threading.Thread(target=run, name=f"{app}_{i}") for i in range(HANDLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        eng.dispose()
    measured = {
        "handlers": HANDLERS,
        "pool_size": HANDLER_POOL,
        "answered": sum(o == f"ok:{users}" for o in outcomes),
        "pool_timeouts": outcomes.count("pool_timeout"),
        "held_during_slow_work": max(held_during, default=None),
    }
    if measured["answered"] == HANDLERS and measured["held_during_slow_work"] == 0:
        return True, f"all {HANDLERS} handlers were in their slow work at once on a pool of {HANDLER_POOL}.", measured
    if measured["pool_timeouts"]:
        return (
            False,
            f"{measured['pool_timeouts']} of {HANDLERS} handlers timed out waiting for a connection that another "
            "handler held through its slow work",
            measured,
        )
    return False, f"{measured['answered']} of {HANDLERS} handlers returned the users count", measured
