"""Closed-loop load against a connection pool: a fair queue in front of it, fixed measuring windows, Little's law.

Chapter 05a's sizing lab: ``closed_loop`` runs ``workers`` threads that each send one statement after
another for a fixed window; ``sizing_sweep`` repeats it over pool sizes and worker counts; ``FairGate``
puts a first-in-first-out line in front of ``QueuePool`` (which is not fair); ``run_threads`` is the
simpler fixed-count variant, and ``warm`` opens a pool's connections before anything is measured.
Nothing here prints; the chapter shows the tables and the plots.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from sqlalchemy import Engine, text


def run_threads(engine: Engine, *, workers: int, tasks: int, stmt, params: dict | None = None) -> dict:
    """Closed loop: ``workers`` threads run ``tasks`` statements in total, each on a connection checked out for it.

    Latency counts from asking the pool to the result; ``wait_ms`` is the part spent waiting for the pool,
    ``held_ms`` the part holding a connection. Returns throughput and latencies.
    """
    latencies: list[float] = []
    held: list[float] = []
    ticket = itertools.count()

    def worker():
        while next(ticket) < tasks:
            t0 = time.perf_counter()
            with engine.connect() as conn:
                t1 = time.perf_counter()
                conn.execute(stmt, params or {}).all()
            t2 = time.perf_counter()
            latencies.append(t2 - t0)
            held.append(t2 - t1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wb_pool") as ex:
        for fut in [ex.submit(worker) for _ in range(workers)]:
            fut.result()
    out = summarize_latencies(latencies, time.perf_counter() - t0, workers=workers)
    out["held_ms"] = statistics.fmean(held) * 1000
    out["wait_ms"] = out["mean_ms"] - out["held_ms"]
    return out


def summarize_latencies(latencies: list[float], wall_s: float, **labels) -> dict:
    """Throughput (per s), mean / p50 / p95 latency (ms) of one run."""
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {
        **labels,
        "tasks": len(latencies),
        "wall_s": wall_s,
        "throughput_per_s": len(latencies) / wall_s,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": q[18] * 1000,
    }


def warm(engine: Engine, n: int) -> None:
    """Open ``n`` pooled connections at once so the first measured checkouts do not pay for connecting."""
    with contextlib.ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(engine.connect()).execute(text("SELECT 1"))


class FairGate:
    """A FIFO queue of ``permits`` in front of a pool: requests are served strictly in arrival order.

    ``QueuePool`` is not fair: a thread that returns a connection and asks again at once takes it back
    before a waiting thread wakes up, so with more threads than connections one thread can do nearly
    all the work while the others starve. Here ``release`` hands its permit straight to the oldest
    waiter (its own ``Event``), so the releasing thread queues behind everybody else. With
    ``permits = pool_size`` the pool itself never makes anyone wait.
    """

    def __init__(self, permits: int):
        self._free = permits
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def acquire(self, timeout: float | None = None) -> bool:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            me = threading.Event()
            self._waiters.append(me)
        if me.wait(timeout):
            return True
        with self._lock:
            if me.is_set():  # handed over between the timeout and the lock: keep it
                return True
            self._waiters.remove(me)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the permit goes to the oldest waiter, not back to the pool
            else:
                self._free += 1


class GateTimeout(Exception):
    """A request waited ``pool_timeout`` for the fair gate (what ``QueuePool`` raises as ``TimeoutError``)."""


def closed_loop(
    engine: Engine,
    *,
    workers: int,
    duration_s: float,
    stmt,
    params: dict | None = None,
    gate: FairGate | None = None,
    pool_timeout: float | None = None,
    settle_s: float = 0.05,
) -> dict:
    """``workers`` threads each send one statement after another for a fixed time; measured in a window.

    The window is ``duration_s`` long and opens ``settle_s`` after every thread started; the threads go on
    until it closes, so there is no drain at the end. Figures:

    - ``tasks``, ``per_worker``, ``throughput_per_s``, ``mean_ms``, ``held_ms``: the tasks that *ended* in
      the window (latency = from asking for a connection to the result; held = holding the connection);
    - ``p50_ms``, ``p95_ms``, ``max_ms``: every request that was in the system during the window, at its
      full latency: a request starved for the whole run counts, however few tasks the others completed;
    - ``in_system``: requests in the system (waiting for or holding a connection), averaged over the window,
      measured directly; ``littles_L`` = throughput x mean latency, what Little's law says it should be;
    - ``busy_connections``: connections checked out, averaged over the window (never above ``pool_size``);
      ``busy_x_held`` = throughput x mean held time, the same law for the pool alone;
    - ``timed_out``: requests that waited ``pool_timeout`` and failed (``gate``: a ``FairGate`` in front of
      the pool; without one the engine's own ``pool_timeout`` applies).
    """
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    done: list[list[tuple[float, float, float]]] = [[] for _ in range(workers)]  # (asked, got, finished)
    failed: list[tuple[float, float]] = []  # (asked, gave up)
    ready = threading.Barrier(workers + 1, timeout=30)
    window: list[float] = []

    def worker(i: int) -> None:
        ready.wait()
        end = window[1]
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                if gate is not None and not gate.acquire(pool_timeout):
                    raise GateTimeout
                try:
                    with engine.connect() as conn:
                        t1 = time.perf_counter()
                        conn.execute(stmt, params or {}).all()
                finally:
                    if gate is not None:
                        gate.release()
                done[i].append((t0, t1, time.perf_counter()))
            except (GateTimeout, PoolTimeout):
                failed.append((t0, time.perf_counter()))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wb_pool_loop") as ex:
        futures = [ex.submit(worker, i) for i in range(workers)]
        t = time.perf_counter()
        window.extend([t + settle_s, t + settle_s + duration_s])
        ready.wait()
        for fut in futures:
            fut.result(timeout=120)
    a, b = window
    inside = [[(t0, t1, t2) for t0, t1, t2 in per if a <= t2 < b] for per in done]
    tasks = [x for per in inside for x in per]
    every = [x for per in done for x in per]
    lat = [t2 - t0 for t0, _, t2 in tasks]
    held = [t2 - t1 for _, t1, t2 in tasks]
    present = sorted(t2 - t0 for t0, _, t2 in every if t0 < b and t2 >= a)
    pct = statistics.quantiles(present, n=100, method="inclusive") if len(present) >= 2 else present * 99

    def clipped(spans) -> float:  # seconds of the spans that fall inside the window
        return sum(max(0.0, min(e, b) - max(s, a)) for s, e in spans)

    overlap = clipped([(x[0], x[2]) for x in every] + failed)
    holding = clipped([(x[1], x[2]) for x in every])
    waiting_at_end = [b - t0 for t0, t1, _ in every if t0 < b <= t1] + [b - t0 for t0, e in failed if t0 < b <= e]
    n = len(tasks)
    per_worker = [len(per) for per in inside]
    out = {
        "workers": workers,
        "tasks": n,
        "per_worker": per_worker,
        "busiest_share": max(per_worker) / n if n else float("nan"),
        "timed_out": sum(a <= e < b for _, e in failed),
        "waiting_at_end": len(waiting_at_end),
        "longest_wait_at_end_ms": max(waiting_at_end, default=0.0) * 1000,
        "throughput_per_s": n / duration_s,
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "p50_ms": pct[49] * 1000 if pct else float("nan"),
        "p95_ms": pct[94] * 1000 if pct else float("nan"),
        "max_ms": present[-1] * 1000 if present else float("nan"),
        "held_ms": statistics.fmean(held) * 1000 if held else float("nan"),
        "in_system": overlap / duration_s,
        "busy_connections": holding / duration_s,
    }
    out["wait_ms"] = out["mean_ms"] - out["held_ms"]
    # Little's law, L = lambda x W: requests in the system = throughput x time each spends in it
    out["littles_L"] = out["throughput_per_s"] * out["mean_ms"] / 1000
    out["busy_x_held"] = out["throughput_per_s"] * out["held_ms"] / 1000  # the law for the pool alone
    out["waiting_for_pool"] = out["throughput_per_s"] * out["wait_ms"] / 1000
    return out


def sizing_sweep(
    pool_sizes,
    workers,
    *,
    duration_s: float,
    service_ms: float,
    repeats: int = 3,
    fair: bool = True,
    pool_timeout: float = 30,
    app: str = "wb_pool_sweep",
    progress: str | None = None,
) -> pd.DataFrame:
    """``closed_loop`` for every pool_size x workers, ``repeats`` times each, on a warmed pool per size.

    Each task is a ``pg_sleep(service_ms)`` on the server, so the shared CPU cores do not decide the result.
    ``fair=True`` puts a ``FairGate`` of ``pool_size`` permits in front of the pool; ``fair=False`` lets the
    threads race for ``QueuePool`` directly. One row per run, with ``repeat`` and ``queue`` columns.
    ``progress``: a label, to show a progress bar (``helpers.progress``: a widget in JupyterLab) over the runs.
    """
    from .database import make_engine
    from .progressbar import progress as progress_bar

    stmt = text("SELECT pg_sleep(:s)")
    rows = []
    bar = progress_bar(
        total=len(pool_sizes) * len(workers) * repeats, desc=progress or "", unit="run", disable=progress is None
    )
    for size in pool_sizes:
        engine = make_engine(
            pool_size=size, max_overflow=0, pool_timeout=pool_timeout, connect_args={"application_name": app}
        )
        try:
            warm(engine, size)
            for w in workers:
                for rep in range(repeats):
                    gate = FairGate(size) if fair else None
                    # settle one full turn of the queue (every waiting worker served once) before measuring
                    settle = max(0.05, 1.5 * w / size * service_ms / 1000)
                    row = closed_loop(
                        engine,
                        workers=w,
                        duration_s=duration_s,
                        stmt=stmt,
                        params={"s": service_ms / 1000},
                        gate=gate,
                        pool_timeout=pool_timeout,
                        settle_s=settle,
                    )
                    rows.append({"queue": "fair" if fair else "QueuePool", "pool_size": size, "repeat": rep, **row})
                    bar.update()
        finally:
            engine.dispose()
    bar.close()
    return pd.DataFrame(rows)


def spread(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Median, min and max of ``value`` over the repeats of each ``by`` group (for error bars)."""
    g = df.groupby(by, sort=False)[value]
    return pd.DataFrame({"median": g.median(), "min": g.min(), "max": g.max()}).reset_index()
