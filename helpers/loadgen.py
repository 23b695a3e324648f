"""A bounded load of readers, writers and inserters that reports every operation's wait (chapter 06).

``with Load(engine, write_sql=..., read_sql=..., insert_sql=...) as load: <migrate>`` then
``load.result``: one row per operation (start, kind, wait, SQLSTATE), so the longest wait and the
throughput over time can be read off. ``hold_transaction`` runs statements in one transaction kept
open for a scripted window (standing for the long part of a migration on a big table).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import psycopg
from sqlalchemy import Engine

from .lockwatch import APP, app_conninfo


@dataclass
class LoadResult:
    """Every operation the load ran: start time (s from the load's start), kind, wait, SQLSTATE."""

    ops: pd.DataFrame
    duration_s: float
    marks: dict[str, float] = field(default_factory=dict)

    def longest_wait(self, kind: str = "write") -> float:
        """The longest single operation of ``kind`` (s): how long some user waited."""
        part = self.ops[self.ops["kind"] == kind]
        return float(part["wait_s"].max()) if len(part) else float("nan")

    def errors(self, kind: str | None = None) -> int:
        """Operations that ended with an error (of ``kind`` when given)."""
        part = self.ops if kind is None else self.ops[self.ops["kind"] == kind]
        return int(part["sqlstate"].notna().sum())

    def count(self, kind: str, start: float = 0.0, end: float | None = None) -> int:
        """Operations of ``kind`` that completed without error between ``start`` and ``end`` (s)."""
        ops = self.ops[(self.ops["kind"] == kind) & self.ops["sqlstate"].isna()]
        t_end = ops["t_s"] + ops["wait_s"]
        return int(((t_end >= start) & (t_end <= (self.duration_s if end is None else end))).sum())

    def throughput(self, bin_s: float = 0.1) -> pd.DataFrame:
        """Completed operations per second in bins of ``bin_s``, by kind (columns t_s, kind, ops_per_s).

        Only whole bins: the last, partial one (the load stopped inside it) would look like a stall.
        """
        ops = self.ops[self.ops["sqlstate"].isna()].copy()
        ops["bin"] = ((ops["t_s"] + ops["wait_s"]) // bin_s).astype(int)
        whole = int(self.duration_s // bin_s)
        frames = []
        for kind in sorted(self.ops["kind"].unique()):
            counts = ops.loc[ops["kind"] == kind, "bin"].value_counts()
            frames.append(
                pd.DataFrame(
                    {
                        "t_s": [round(b * bin_s, 6) for b in range(whole)],
                        "kind": kind,
                        "ops_per_s": [counts.get(b, 0) / bin_s for b in range(whole)],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


class Load:
    """Readers, writers and inserters on their own connections, each op a short autocommit statement, bounded.

    ``with Load(engine, write_sql=..., read_sql=..., insert_sql=...) as load: <migrate>`` then ``load.result``.
    The SQL takes one parameter ``%(id)s`` drawn (seeded) from ``ids``. Every op is bounded by
    ``lock_timeout``; the whole load stops by itself after ``max_s`` seconds.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        write_sql: str | None = None,
        read_sql: str | None = None,
        insert_sql: str | None = None,
        ids: range = range(1, 1001),
        writers: int = 2,
        readers: int = 1,
        inserters: int = 1,
        rate_per_s: float = 100,
        max_s: float = 30.0,
        lock_timeout: str = "10s",
        seed: int = 6,
        app: str = APP + "_load",
    ):
        self.engine, self.ids, self.rate, self.max_s, self.lock_timeout, self.app = (
            engine,
            ids,
            rate_per_s,
            max_s,
            lock_timeout,
            app,
        )
        self.plan = [("write", write_sql, seed + i) for i in range(writers if write_sql else 0)]
        self.plan += [("read", read_sql, seed + 100 + i) for i in range(readers if read_sql else 0)]
        self.plan += [("insert", insert_sql, seed + 200 + i) for i in range(inserters if insert_sql else 0)]
        self._stop = threading.Event()
        self._ops: list[tuple] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(len(self.plan) + 1)
        self.marks: dict[str, float] = {}
        self.result: LoadResult | None = None

    def _worker(self, kind: str, sql: str, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(**app_conninfo(self.engine, self.app), autocommit=True) as conn:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (self.lock_timeout,))
            conn.execute("SELECT set_config('statement_timeout', '20s', false)")
            self._ready.wait(10)
            next_at = time.perf_counter()
            while not self._stop.is_set() and time.perf_counter() - self.t0 < self.max_s:
                t_start = time.perf_counter()
                try:
                    conn.execute(sql, {"id": rng.choice(self.ids)})
                    sqlstate = None
                except psycopg.Error as exc:
                    sqlstate = exc.sqlstate
                t_end = time.perf_counter()
                with self._lock:
                    self._ops.append((t_start - self.t0, kind, t_end - t_start, sqlstate))
                next_at = max(next_at + 1 / self.rate, t_end)
                self._stop.wait(max(0.0, next_at - time.perf_counter()))  # pacing, decides nothing

    def start(self) -> Load:
        self.t0 = time.perf_counter()
        for kind, sql, seed in self.plan:
            t = threading.Thread(target=self._worker, args=(kind, sql, seed), daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait(10)
        self.t0 = time.perf_counter()
        return self

    def mark(self, label: str) -> float:
        """Note the time (s from the load's start) of an event, e.g. 'migration starts'."""
        self.marks[label] = time.perf_counter() - self.t0
        return self.marks[label]

    def stop(self) -> LoadResult:
        if self.result is not None:
            return self.result
        self._stop.set()
        for t in self._threads:
            t.join(30)
        duration = time.perf_counter() - self.t0
        ops = pd.DataFrame(self._ops, columns=["t_s", "kind", "wait_s", "sqlstate"]).sort_values("t_s")
        self.result = LoadResult(ops.reset_index(drop=True), duration, dict(self.marks))
        return self.result

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def hold_transaction(
    engine: Engine,
    statements: list,
    hold_s: float,
    lock_timeout: str = "10s",
    app: str = APP + "_migration",
    after: Callable[[], object] | None = None,
) -> float:
    """Run ``statements`` in one transaction kept open ``hold_s`` more seconds (a scripted window); returns s.

    ``after`` is called once the statements have run (their locks are held), before the window.
    """
    t0 = time.perf_counter()
    with psycopg.connect(**app_conninfo(engine, app)) as conn:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        for stmt in statements:
            conn.execute(stmt)
        if after is not None:
            after()
        time.sleep(hold_s)  # stands for the long part of a migration on a big table
        conn.commit()
    return time.perf_counter() - t0
