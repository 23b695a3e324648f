"""Exercises of chapter 05b (pools in production): a stale pool that must recover, a timeout that must not leak.

Each judge opens a pool of its own on the engine's URL (application_name ``wb_pool_ex_...``) and
judges what the server did: whether the first request after the pool's backends were terminated
succeeded, whether a statement was cancelled with SQLSTATE 57014, and what ``statement_timeout`` the
pooled connection carries afterwards. Nothing depends on a timing.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, exc, text

from ..pooling import error_summary, terminate_backends
from ..poolload import warm
from ..scratch import scratch_suffix
from .registry import exercise

SLEEP_S = 1  # exercise 2: the slow report's pg_sleep; its timeout is TIMEOUT
TIMEOUT = "100ms"
POOL_KEYS = {"pool_pre_ping", "pool_recycle", "pool_timeout", "pool_reset_on_return", "pool_use_lifo", "echo_pool"}


def _app(what: str) -> str:
    return f"wb_pool_ex_{what}_{scratch_suffix()}"


# ----------------------------------------------------------------------------- exercise 1: survive a restart
def solution_engine_options() -> dict:
    """Test each connection at checkout: a dead one is replaced before the request sees it."""
    return {"pool_pre_ping": True}


def wrong_engine_options() -> dict:
    """Plausible but wrong: recycling replaces connections by age, and these died a moment ago."""
    return {"pool_recycle": 3600}


@exercise(
    "05b",
    "pool_pre_ping_recovery",
    "Pool options so that the first request after a server restart succeeds",
    solution=solution_engine_options,
    wrong=wrong_engine_options,
    hint="only a check at checkout (one round trip, pool_pre_ping) notices a connection that died a moment ago; "
    "pool_recycle goes by age, and pool_timeout by waiting.",
)
def judge_pre_ping_recovery(answer, engine: Engine):
    options = dict(answer())
    unknown = set(options) - POOL_KEYS
    if unknown:
        return False, f"use pool options only ({', '.join(sorted(POOL_KEYS))}), not {sorted(unknown)}.", {}
    app = _app("stale")
    eng = create_engine(engine.url, pool_size=2, max_overflow=0, **options, connect_args={"application_name": app})
    try:
        warm(eng, 2)  # two idle connections in the pool
        terminated = terminate_backends(engine, app)  # a restart, as the pool sees it: every backend gone
        try:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1")).scalar_one()
            first = "ok"
        except exc.DBAPIError as e:
            first = f"failed: {error_summary(e)['driver_error']}"
    finally:
        eng.dispose()
    measured = {"backends_terminated": terminated, "first_request": first}
    if terminated != 2:
        return False, f"{terminated} backends were terminated, not the pool's 2.", measured
    if first != "ok":
        return False, f"the first request after the restart {first}", measured
    return True, "the pool noticed its dead connections at checkout, and the first request succeeded.", measured


# ----------------------------------------------------------------------------- exercise 2: a timeout for one transaction
def solution_slow_report(engine) -> None:
    """SET LOCAL, written as set_config(..., true) so the value is a bound parameter: it ends with the transaction."""
    with engine.begin() as conn:
        conn.execute(text("SELECT set_config('statement_timeout', :t, true)"), {"t": "100ms"})
        conn.execute(text("SELECT pg_sleep(1)"))


def wrong_slow_report(engine) -> None:
    """Plausible but wrong: a session-level SET, committed so that it sticks: it sticks to the pooled connection."""
    with engine.connect() as conn:
        conn.execute(text("SET statement_timeout = '100ms'"))
        conn.commit()
        conn.execute(text("SELECT pg_sleep(1)"))


@exercise(
    "05b",
    "pool_statement_timeout_local",
    f"Cancel the slow report after {TIMEOUT}, for this transaction only",
    solution=solution_slow_report,
    wrong=wrong_slow_report,
    hint="a SET lasts for the session, and a pooled connection's session outlives the request: "
    "set_config('statement_timeout', :t, true) (SET LOCAL) ends with the transaction.",
    namespace=lambda: {"text": text},
)
def judge_statement_timeout_local(answer, engine: Engine):
    app = _app("timeout")
    eng = create_engine(engine.url, pool_size=1, max_overflow=0, connect_args={"application_name": app})
    try:
        with eng.connect() as conn:
            before = conn.execute(text("SHOW statement_timeout")).scalar_one()
        try:
            answer(eng)
            error = None
        except exc.DBAPIError as e:
            error = error_summary(e)
        with eng.connect() as conn:  # the same pooled connection (pool_size=1): what did the answer leave on it?
            after = conn.execute(text("SHOW statement_timeout")).scalar_one()
    finally:
        eng.dispose()
    measured = {
        "sqlstate": error and error["sqlstate"],
        "driver_error": error and error["driver_error"],
        "statement_timeout_before": before,
        "statement_timeout_after": after,
    }
    if error is None:
        return False, "the report ran to the end: no statement was cancelled", measured
    if error["sqlstate"] != "57014":
        return False, f"the report failed with {error['driver_error']} ({error['sqlstate']}), not 57014", measured
    if after != before:
        return (
            False,
            f"cancelled with 57014, but the pooled connection now carries statement_timeout={after} (was {before}) "
            "for every later request",
            measured,
        )
    return True, f"cancelled with 57014, and the pooled connection went back with statement_timeout={after}.", measured
