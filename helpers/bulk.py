"""Bulk-load instruments (chapter 07b): reset the target table, the rows to write, a sweep over sizes, rates and peak memory.

The bulk methods themselves (ORM ``add_all`` ... COPY, the set-based updates, the read strategies)
are chapter 07b's lesson and live in its cells; each is a function ``fn(engine, n)``, in the
spirit of SQLAlchemy's ``examples/performance``. This module times them (``sweep``: ``measure``
at each size, with a progress bar), prepares their target (``truncate_items``, ``fill_items``
on the scratch table ``rawsql.Item``) and measures what they cost (``rows_per_s``, ``peak_memory``).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterable

import pandas as pd
from psycopg import sql as pgsql
from sqlalchemy import Engine, Integer, Text, bindparam, func, insert, literal, select

from .rawsql import Item, qualified, run_composed
from .timing import measure
from .waits import bounded


def rows_for(n: int) -> list[dict]:
    """The n rows every insert method writes (as dicts): ``{"name": "item i", "value": i}``, i = 1..n."""
    return [{"name": f"item {i}", "value": i} for i in range(1, n + 1)]


def truncate_items(engine: Engine) -> None:
    """Empty the bulk-write target and restart its identity."""
    query = pgsql.SQL("TRUNCATE {} RESTART IDENTITY").format(qualified(engine, "items"))
    with engine.begin() as conn, bounded(conn, "emptying chapter 07b's items"):
        run_composed(conn, query)


def fill_items(engine: Engine, n: int) -> None:
    """Truncate, then insert the rows of ``rows_for(n)`` made on the server (the untimed set-up of the updates)."""
    truncate_items(engine)
    g = func.generate_series(1, bindparam("n", type_=Integer)).column_valued("g")
    stmt = insert(Item.__table__).from_select(["name", "value"], select(literal("item ") + g.cast(Text), g))
    with engine.begin() as conn:
        conn.execute(stmt, {"n": n})


def rows_per_s(timings: pd.DataFrame) -> pd.DataFrame:
    """Add ``rows_per_s`` (n / median_s) to a ``measure`` sweep labelled with ``n``."""
    out = timings.copy()
    out["rows_per_s"] = out["n"] / out["median_s"]
    return out


def sweep(
    methods: dict[str, Callable[[Engine, int], object]],
    engine: Engine,
    sizes: Iterable[int],
    *,
    setup: Callable[[int], object] | None = None,
    desc: str = "sweep",
    **measure_kw,
) -> pd.DataFrame:
    """``measure`` every ``fn(engine, n)`` at every size (warm-up once at the smallest), with ``rows_per_s``.

    ``setup(n)`` runs untimed before every repetition. A progress bar (``helpers.progress``: a widget in
    JupyterLab, one line in a headless run) counts the (size, method) points.
    """
    from .progressbar import progress

    sizes = list(sizes)
    parts = []
    with progress(total=len(sizes) * len(methods), desc=desc, unit="point") as bar:
        for n in sizes:
            for name, fn in methods.items():
                parts.append(
                    measure(
                        {name: lambda fn=fn, n=n: fn(engine, n)},
                        setup=(lambda n=n: setup(n)) if setup else None,
                        warmup=int(n == sizes[0]),
                        n=n,
                        **measure_kw,
                    )
                )
                bar.update()
    return rows_per_s(pd.concat(parts, ignore_index=True))


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """(result, peak bytes allocated by Python while ``fn`` ran), measured with tracemalloc."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak
