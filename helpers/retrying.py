"""Retrying a whole transaction when PostgreSQL says "try again": 40001, 40P01, 23505, 23P01.

A serialization failure (``40001``) or a deadlock (``40P01``) means the transaction was rolled
back and running it again may succeed. PostgreSQL's documentation (§13.5, "Serialization Failure
Handling") advises retrying unique-key (``23505``) and exclusion-constraint (``23P01``) violations
too: when two transactions insert the same key after each checked that it was free, the loser's
error is a serialization failure in disguise, and on its retry the check sees the winner's row and
takes the other branch. (A retry of a transaction whose key is simply taken fails the same way each
time and is raised after ``attempts``.) ``retry`` re-runs the *whole* transaction (the callable
must open and close its own, e.g. ``with engine.begin() as conn:``) with exponential backoff and
full jitter, a bounded number of times; any other error is raised at once::

    @retry(attempts=5)
    def transfer(engine, a, b, amount): ...

    retry(transfer, attempts=5)(engine, 1, 2, 10)     # the same, as a call
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable

#: what to retry, by SQLSTATE (``anomalies.PREVENTED_BY`` is another thing: how an anomaly was prevented)
RETRYABLE = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "23505",  # unique_violation: may be a serialization failure in disguise (PostgreSQL docs §13.5)
        "23P01",  # exclusion_violation: likewise
    }
)


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a psycopg / SQLAlchemy error (following ``.orig`` and ``__cause__``), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "sqlstate", None)
        if code:
            return code
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None


def is_retryable(exc: BaseException) -> bool:
    """True for a serialization failure (40001), a deadlock (40P01), or a unique/exclusion violation (23505, 23P01)."""
    return sqlstate(exc) in RETRYABLE


def backoff(attempt: int, *, base: float = 0.005, cap: float = 0.25, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``: uniform in [0, min(cap, base * 2**(attempt-1))] (full jitter)."""
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def retry(
    fn: Callable | None = None,
    *,
    attempts: int = 5,
    also: tuple[type[BaseException], ...] = (),
    base: float = 0.005,
    cap: float = 0.25,
    on_retry: Callable[[int, BaseException, float], object] | None = None,
    rng: random.Random | None = None,
    sleep: Callable[[float], object] = time.sleep,
):
    """Run ``fn`` again on a ``RETRYABLE`` SQLSTATE, at most ``attempts`` times in all, backing off with jitter.

    ``also``: exception types to retry besides the SQLSTATEs, e.g. SQLAlchemy's ``StaleDataError`` (an
    optimistic version check that lost) or an exception of your own. Used bare (``@retry``), with options (``@retry(attempts=3)``) or as a call
    (``retry(fn, attempts=3)(*args)``). ``on_retry(attempt, exc, delay)`` is called before each
    wait. When the attempts run out the last error is raised, with a note saying how many were made.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for attempt in range(1, attempts + 1):
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    if not (is_retryable(exc) or isinstance(exc, also)):
                        raise
                    if attempt == attempts:
                        why = f"SQLSTATE {sqlstate(exc)}" if sqlstate(exc) else type(exc).__name__
                        exc.add_note(f"retry: gave up after {attempts} attempts ({why})")
                        raise
                    delay = backoff(attempt, base=base, cap=cap, rng=rng)
                    if on_retry is not None:
                        on_retry(attempt, exc, delay)
                    sleep(delay)
            raise AssertionError("unreachable")  # pragma: no cover

        return wrapper

    return decorate(fn) if fn is not None else decorate
