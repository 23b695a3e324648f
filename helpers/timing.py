"""Repeated measurement: warm-up, repeats that adapt to the case's speed, median and spread.

In the spirit of SQLAlchemy's ``examples/performance``: a case is a named callable; the
harness does the repetition. Fast cases are repeated more (up to ``max_repeat``) so their
median is stable; slow ones at least ``min_repeat`` times, within ``budget_s`` per case.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pandas as pd

COLUMNS = ["case", "median_s", "min_s", "max_s", "iqr_s", "repeats"]


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(
    cases: dict[str, Callable[[], object]] | Callable[[], object],
    *,
    warmup: int = 1,
    min_repeat: int = 3,
    max_repeat: int = 25,
    budget_s: float = 0.5,
    repeat: int | None = None,
    setup: Callable[[], object] | None = None,
    **labels,
) -> pd.DataFrame:
    """Time each case; one row per case: median, min, max, IQR (seconds) and repeats, plus ``labels``.

    ``setup`` (if given) runs untimed before every repetition. ``repeat`` fixes the count.
    Sweeps concatenate: ``pd.concat(measure(cases, n=n) for n in sizes)``.
    """
    if callable(cases):
        cases = {getattr(cases, "__name__", "case"): cases}
    rows = []
    for name, fn in cases.items():
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        target = repeat or max_repeat
        while len(times) < target:
            if setup:
                setup()
            times.append(time_once(fn))
            if repeat is None and len(times) >= min_repeat and time.perf_counter() > deadline:
                break
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        rows.append(
            {
                "case": name,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "iqr_s": q[2] - q[0],
                "repeats": len(times),
                **labels,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS + [k for k in labels])
