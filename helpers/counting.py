"""Counting and capturing the SQL a block of code sends.

Listens to the Engine's ``before_cursor_execute`` / ``after_cursor_execute`` events, so it
sees exactly what reaches the driver: one entry per ``cursor.execute`` / ``executemany``
(an ``insertmanyvalues`` batch is one statement, as it is on the server). A plain driver
``executemany`` (UPDATE/DELETE, or INSERT without RETURNING, with a list of parameter sets) is one
entry but runs once per set on the server: ``QueryLog.executions`` counts those as the server's
``pg_stat_statements`` does. Transaction control (BEGIN/COMMIT/ROLLBACK) is not a cursor
execution and is not counted.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy import Engine, event

_IN_LIST = re.compile(
    r"(\bIN\s*)\(\s*(?:%\(\w+\)s|%s|\$\d+|\?|:\w+)(?:\s*,\s*(?:%\(\w+\)s|%s|\$\d+|\?|:\w+))+\s*\)", re.I
)
_PARAM = re.compile(r"%\(\w+\)s|%s|\$\d+|(?<!:):\w+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_STRING = re.compile(r"'(?:[^']|'')*'")
_SPACE = re.compile(r"\s+")
_VALUES = re.compile(r"VALUES\s*(\(\s*\?(?:\s*,\s*\?)*\s*\))(?:\s*,\s*\(\s*\?(?:\s*,\s*\?)*\s*\))+", re.I)


def statement_shape(sql: str) -> str:
    """The statement with parameters and literals replaced by ``?`` and IN / VALUES lists folded."""
    s = _STRING.sub("?", sql)
    s = _IN_LIST.sub(r"\1(?, ...)", s)  # IN (...) lists only: a VALUES row keeps its columns
    s = _PARAM.sub("?", s)
    s = _NUMBER.sub("?", s)
    s = _VALUES.sub(r"VALUES \1, ...", s)
    return _SPACE.sub(" ", s).strip()


@dataclass
class Statement:
    sql: str
    parameters: object
    duration_s: float
    rows: int
    executemany: bool

    @property
    def shape(self) -> str:
        return statement_shape(self.sql)

    @property
    def executions(self) -> int:
        """Executions on the server: a driver ``executemany`` runs once per parameter set (psycopg pipelines them)."""
        if self.executemany and isinstance(self.parameters, (list, tuple)):
            return len(self.parameters)
        return 1


@dataclass
class QueryLog:
    """What ``count_queries`` captured: ``.count``, ``.statements``, ``.df``, ``.by_shape()``."""

    statements: list[Statement] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)

    @property
    def executions(self) -> int:
        """What ``pg_stat_statements`` counts as calls: ``count``, with each executemany counted per parameter set."""
        return sum(s.executions for s in self.statements)

    @property
    def total_s(self) -> float:
        return sum(s.duration_s for s in self.statements)

    @property
    def df(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "sql": s.sql,
                    "shape": s.shape,
                    "parameters": s.parameters,
                    "duration_ms": s.duration_s * 1e3,
                    "rows": s.rows,
                    "executemany": s.executemany,
                }
                for s in self.statements
            ],
            columns=["sql", "shape", "parameters", "duration_ms", "rows", "executemany"],
        )

    def by_shape(self) -> pd.DataFrame:
        """One row per statement shape, most frequent first: an N+1 is the shape sent N times."""
        df = self.df
        if df.empty:
            return pd.DataFrame(columns=["shape", "count", "total_ms", "rows"])
        out = (
            df.groupby("shape", sort=False)
            .agg(count=("sql", "size"), total_ms=("duration_ms", "sum"), rows=("rows", "sum"))
            .reset_index()
            .sort_values(["count", "total_ms"], ascending=False, kind="stable")
            .reset_index(drop=True)
        )
        return out

    def sql(self, i: int | None = None) -> str:
        """The SQL of statement i, or of all statements separated by blank lines."""
        if i is not None:
            return self.statements[i].sql
        return "\n\n".join(s.sql for s in self.statements)

    def __repr__(self) -> str:
        return f"QueryLog(count={self.count}, shapes={len(self.by_shape())}, total_ms={self.total_s * 1e3:.2f})"

    def _repr_html_(self) -> str:
        return f"<p><b>{self.count} statement(s)</b>, {self.total_s * 1e3:.2f} ms</p>" + self.by_shape().to_html(
            index=False
        )


def _target(engine: Engine | None) -> Engine:
    if engine is None:
        from .database import get_engine

        return get_engine()
    return getattr(engine, "sync_engine", engine)  # AsyncEngine too


@contextmanager
def count_queries(engine: Engine | None = None):
    """Capture every statement the block sends through ``engine`` (default: the shared engine).

    >>> with count_queries() as q:
    ...     session.scalars(select(User)).all()
    >>> q.count, q.by_shape()
    """
    engine = _target(engine)
    log = QueryLog()
    starts: dict[int, float] = {}

    def before(conn, cursor, statement, parameters, context, executemany):
        starts[id(cursor)] = time.perf_counter()

    def after(conn, cursor, statement, parameters, context, executemany):
        t = time.perf_counter() - starts.pop(id(cursor), time.perf_counter())
        rows = cursor.rowcount if cursor.rowcount is not None else -1
        log.statements.append(Statement(statement, parameters, t, rows, bool(executemany)))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield log
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


class TooManyQueries(AssertionError):
    pass


@contextmanager
def assert_max_queries(n: int, engine: Engine | None = None):
    """Fail (TooManyQueries, an AssertionError) when the block sends more than ``n`` statements.

    The N+1 guard for a team's own tests: the message lists the repeated statement shapes.
    """
    with count_queries(engine) as log:
        yield log
    if log.count > n:
        shapes = log.by_shape().head(5)
        listing = "\n".join(f"  {r['count']:>5} x  {r['shape'][:160]}" for _, r in shapes.iterrows())
        raise TooManyQueries(f"expected at most {n} statement(s), the block sent {log.count}:\n{listing}")
