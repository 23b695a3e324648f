"""Connection pools, measured: status, events, health, workloads, limits (Prometheus: ``helpers.exporter``).

Everything here reads a SQLAlchemy ``Engine``'s pool or drives it; nothing prints. The
connection-pooling chapter (``notebooks/05_connection_pooling.ipynb``) shows the code that teaches;
this module holds the harness around it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pandas as pd
import psycopg
from psycopg import sql
from sqlalchemy import Engine, event, text

from .config import REPO_ROOT, WorkbookError
from .database import database_url, psycopg_conninfo
from .processes import alive, die_with_parent

ROLE_PREFIX = "wb_pool_limited_"


# ----------------------------------------------------------------------------- status and health
@dataclass(frozen=True)
class PoolStatus:
    """What a pool holds right now; ``capacity`` is pool_size + max_overflow (None when unbounded)."""

    pool_class: str
    size: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None
    capacity: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def pool_status(engine: Engine) -> PoolStatus:
    """Size, checked-in, checked-out and overflow of ``engine``'s pool (None where the pool has no such figure)."""
    pool = engine.pool
    name = type(pool).__name__
    if not hasattr(pool, "checkedout"):
        return PoolStatus(name, None, None, None, None, None)
    size, overflow = pool.size(), pool.overflow()
    max_overflow = getattr(pool, "_max_overflow", 0)
    capacity = None if max_overflow < 0 else size + max_overflow
    return PoolStatus(name, size, pool.checkedin(), pool.checkedout(), overflow, capacity)


@dataclass(frozen=True)
class HealthReport:
    """Result of ``health_check``: status ``ok`` / ``saturated`` / ``down``, round-trip latency, pool figures."""

    status: str
    latency_ms: float | None
    error: str | None
    pool: dict

    def as_dict(self) -> dict:
        return asdict(self)


def health_check(engine: Engine, *, timeout_ms: int = 1000) -> HealthReport:
    """One bounded ``SELECT 1`` through the pool; a saturated pool is reported without waiting for a checkout."""
    status = pool_status(engine)
    if status.capacity is not None and status.checked_out >= status.capacity:
        return HealthReport("saturated", None, "every pooled connection is checked out", status.as_dict())
    t0 = time.perf_counter()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT set_config('statement_timeout', :v, true)"), {"v": f"{int(timeout_ms)}ms"})
            conn.execute(text("SELECT 1")).scalar_one()
            conn.rollback()
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure as "down"
        return HealthReport("down", None, error_summary(exc)["message"], pool_status(engine).as_dict())
    latency = (time.perf_counter() - t0) * 1000
    return HealthReport("ok", round(latency, 3), None, pool_status(engine).as_dict())


def error_summary(exc: BaseException) -> dict:
    """Class, SQLSTATE and first message line of an exception (the DBAPI error under SQLAlchemy's wrapper)."""
    orig = getattr(exc, "orig", None) or exc
    text_ = str(orig).strip()
    if "FATAL:" in text_:  # connection refusals: keep the server's words, not libpq's preamble
        text_ = text_.rsplit("FATAL:", 1)[1].strip()
    message = text_.splitlines()[0] if text_ else type(orig).__name__
    return {
        "error": type(exc).__name__,
        "driver_error": type(orig).__name__ if orig is not exc else None,
        "sqlstate": getattr(orig, "sqlstate", None),
        "message": message,
    }


# ----------------------------------------------------------------------------- events
POOL_EVENTS = ("connect", "checkout", "checkin", "invalidate", "soft_invalidate", "close", "detach")


class PoolEventLog:
    """Pool events kept in memory: each listener appends one tuple to a bounded deque and bumps a counter.

    No formatting, no I/O and no logging call on the hot path; ``.df`` formats later, off it.
    """

    def __init__(self, engine: Engine, *, maxlen: int = 10_000, events: tuple[str, ...] = POOL_EVENTS):
        self.engine = engine
        self.events: deque = deque(maxlen=maxlen)
        self._counts = dict.fromkeys(events, 0)
        self._lock = threading.Lock()
        self._listeners = {name: self._listener(name) for name in events}
        for name, fn in self._listeners.items():
            event.listen(engine, name, fn)

    def _listener(self, name: str):
        append, clock, lock, counts = self.events.append, time.perf_counter_ns, self._lock, self._counts

        def on_event(dbapi_connection, *_args):
            append((clock(), name, id(dbapi_connection)))
            with lock:
                counts[name] += 1

        return on_event

    def counts(self) -> dict:
        """Events seen so far, by name (not limited by ``maxlen``)."""
        with self._lock:
            return dict(self._counts)

    @property
    def df(self) -> pd.DataFrame:
        """The retained events: t_ms (since the first), event, conn (a short id of the DBAPI connection)."""
        rows = list(self.events)
        if not rows:
            return pd.DataFrame(columns=["t_ms", "event", "conn"])
        t0 = rows[0][0]
        ids = {c: f"c{i}" for i, c in enumerate(dict.fromkeys(r[2] for r in rows))}
        return pd.DataFrame([{"t_ms": (t - t0) / 1e6, "event": e, "conn": ids[c]} for t, e, c in rows])

    def close(self) -> None:
        """Remove the listeners."""
        for name, fn in self._listeners.items():
            if event.contains(self.engine, name, fn):
                event.remove(self.engine, name, fn)


# Prometheus: the pool collector and chapter 05's pool_metrics / metrics_text / parse_metrics are in
# helpers/exporter.py, the one exporter chapters 05 and 09 share.


# ----------------------------------------------------------------------------- workloads
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
) -> pd.DataFrame:
    """``closed_loop`` for every pool_size x workers, ``repeats`` times each, on a warmed pool per size.

    Each task is a ``pg_sleep(service_ms)`` on the server, so the shared CPU cores do not decide the result.
    ``fair=True`` puts a ``FairGate`` of ``pool_size`` permits in front of the pool; ``fair=False`` lets the
    threads race for ``QueuePool`` directly. One row per run, with ``repeat`` and ``queue`` columns.
    """
    from .database import make_engine

    stmt = text("SELECT pg_sleep(:s)")
    rows = []
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
        finally:
            engine.dispose()
    return pd.DataFrame(rows)


def spread(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Median, min and max of ``value`` over the repeats of each ``by`` group (for error bars)."""
    g = df.groupby(by, sort=False)[value]
    return pd.DataFrame({"median": g.median(), "min": g.min(), "max": g.max()}).reset_index()


# ----------------------------------------------------------------------------- server limits
def connection_budget(engine: Engine) -> dict:
    """max_connections, the reserved slots, connections in use now, and what is left for non-superusers."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int, "
                "coalesce(current_setting('reserved_connections', true), '0')::int, "
                "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
        ).one()
    max_c, su_reserved, reserved, in_use = row
    return {
        "max_connections": max_c,
        "superuser_reserved_connections": su_reserved,
        "reserved_connections": reserved,
        "client_backends_now": in_use,
        "for_applications": max_c - su_reserved - reserved,
        "free_now": max_c - su_reserved - reserved - in_use,
    }


def terminate_backends(engine: Engine, application_name: str) -> int:
    """pg_terminate_backend on the backends carrying ``application_name`` (ours only); waits until they are gone."""
    if not application_name.startswith("wb_pool"):
        raise ValueError("only backends of this chapter (application_name wb_pool...) may be terminated")
    with engine.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE application_name = :app AND pid <> pg_backend_pid()"
            ),
            {"app": application_name},
        ).scalar_one()
        conn.commit()
    return int(n)


@contextlib.contextmanager
def limited_role(limit: int = 2):
    """A LOGIN role of this kernel's own with CONNECTION LIMIT ``limit``; yields its URL; drops it afterwards.

    Named ``wb_pool_limited_<kernel>`` (``helpers.scratch``: roles are server-wide, so two trainees'
    kernels must not share one), stamped, and dropped only as the role this process created. A killed
    kernel's role is removed by ``python -m helpers reset``.
    """
    from .scratch import create_role, drop_role

    pw = secrets.token_urlsafe(16)
    conninfo = psycopg_conninfo()
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        name = create_role(
            conn,
            ROLE_PREFIX.rstrip("_"),
            sql.SQL("LOGIN NOSUPERUSER CONNECTION LIMIT {} PASSWORD {}").format(sql.Literal(limit), sql.Literal(pw)),
        )
    try:
        yield database_url().set(username=name, password=pw)
    finally:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (name,))
            drop_role(conn, name)


# ----------------------------------------------------------------------------- a throwaway server of our own
_THROWAWAY = r"""
import json, os, pathlib, shutil, signal, sys
import psycopg
from helpers import server
from helpers.config import WorkbookError
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
OWN = os.environ.get("WORKBOOK_STATE", "")
if not os.path.basename(OWN).startswith("wb-pool-") or server.state_root() != pathlib.Path(OWN):
    sys.exit("refusing to run: WORKBOOK_STATE is not a throwaway folder of this demo")
out = {}
try:
    info = server.start()
    pw = server.password()
    su = dict(host="127.0.0.1", port=info.port, user=server.SUPERUSER, password=pw, dbname="postgres", connect_timeout=5)
    with psycopg.connect(**su, autocommit=True) as c:
        c.execute("ALTER SYSTEM SET max_connections = %d" % int(sys.argv[1]))
        c.execute("ALTER SYSTEM SET superuser_reserved_connections = %d" % int(sys.argv[2]))
        c.execute("ALTER SYSTEM SET shared_buffers = '16MB'")
        c.execute("CREATE ROLE wb_pool_app LOGIN PASSWORD 'app'")
    server.stop()
    info = server.start()
    su["port"] = info.port  # the restart may have moved the server to another port
    app = dict(su, user="wb_pool_app", password="app")
    held, events = [], []
    for who, kw in (("application role", app), ("superuser", su)):
        while len(held) < 50:
            try:
                held.append(psycopg.connect(**kw, autocommit=True))
            except psycopg.OperationalError as exc:
                events.append({"who": who, "opened_before_error": len(held),
                               "message": str(exc).strip().rsplit("FATAL:", 1)[-1].strip()})
                break
    with held[0].cursor() as cur:
        cur.execute("SHOW max_connections"); mc = int(cur.fetchone()[0])
        cur.execute("SHOW superuser_reserved_connections"); sr = int(cur.fetchone()[0])
        cur.execute("SHOW server_version"); ver = cur.fetchone()[0]
    for h in held:
        h.close()
    out = {"max_connections": mc, "superuser_reserved_connections": sr, "server_version": ver, "events": events}
finally:
    try:
        server.stop()
        shutil.rmtree(OWN, ignore_errors=True)
    except WorkbookError as exc:
        out["stop_error"] = str(exc)
print(json.dumps(out))
"""


class TooManyClients:
    """The throwaway-server demo running in the background: ``.result()`` waits for it (bounded)."""

    def __init__(self, max_connections: int = 6, superuser_reserved: int = 3, timeout_s: float = 120):
        with contextlib.suppress(OSError):
            reap_throwaways(wait_s=0)  # folders of kernels that died mid-demo (their owner is gone)
        self.state = tempfile.mkdtemp(prefix=THROWAWAY_PREFIX)
        os.chmod(self.state, 0o755)
        _write_owner(self.state, child=None)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WORKBOOK_PORT")}
        env["WORKBOOK_STATE"] = self.state
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.env, self.timeout_s, self.t0 = env, timeout_s, time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _THROWAWAY, str(max_connections), str(superuser_reserved)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO_ROOT),
            preexec_fn=_nice_and_die_with_parent,
        )
        _write_owner(self.state, child=self.process.pid)

    def result(self) -> dict:
        """What the throwaway server said (its folder is removed and its server stopped before this returns)."""
        try:
            out, err = self.process.communicate(timeout=max(1.0, self.timeout_s - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.process.terminate()
            out, err = self.process.communicate(timeout=30)
        finally:
            _stop_leftover(self.state, self.env)
            shutil.rmtree(self.state, ignore_errors=True)
        if self.process.returncode != 0:
            raise WorkbookError(f"The throwaway server demo failed: {err.strip()[-800:]}")
        data = json.loads(out.strip().splitlines()[-1])
        data["seconds"] = round(time.perf_counter() - self.t0, 1)
        return data


def too_many_clients(max_connections: int = 6, superuser_reserved: int = 3, timeout_s: float = 120) -> dict:
    """Fill a throwaway embedded server (own data folder, own port) until PostgreSQL refuses; return what it said.

    Runs in a subprocess with ``WORKBOOK_STATE`` on a temp folder, so the shared server is never touched;
    the throwaway server is stopped and its folder removed before this returns. ``TooManyClients(...)``
    starts the same in the background.
    """
    return TooManyClients(max_connections, superuser_reserved, timeout_s).result()


def _nice_and_die_with_parent() -> None:
    """In the child: lowest CPU priority (it runs beside measurements), SIGTERM when the parent dies."""
    os.nice(19)
    die_with_parent()


def _stop_leftover(state: str, env: dict) -> None:
    """If the subprocess died before stopping its server, stop it now (it lives in our temp folder)."""
    if not os.path.isdir(state):
        return
    for pidfile in (os.path.join(state, d, "data", "postmaster.pid") for d in os.listdir(state) if d.startswith("pg")):
        if os.path.exists(pidfile):
            subprocess.run(
                [sys.executable, "-c", "from helpers import server; server.stop()"],
                env=env,
                cwd=str(REPO_ROOT),
                capture_output=True,
                timeout=60,
            )


# ----------------------------------------------------------------------------- leftovers of a dead kernel
THROWAWAY_PREFIX = "wb-pool-"
OWNER_FILE = "owner.json"
_OWNER_MARK = "qo-workbook throwaway server"


def _write_owner(state: str, child: int | None) -> None:
    """Record who made this folder (this process) and the demo's subprocess, for ``reap_throwaways``."""
    tmp = os.path.join(state, OWNER_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"mark": _OWNER_MARK, "owner": os.getpid(), "child": child}, fh)
    os.replace(tmp, os.path.join(state, OWNER_FILE))


def _runs_in_env(pid: int, variable: str, value: str) -> bool:
    """True when process ``pid`` was started with ``variable=value`` (proof that a recorded pid is still
    the process we started, not a stranger that got the number since)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{variable}={value}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _processes_in(folder: str) -> list[int]:
    """Processes whose working directory is ``folder`` or below: the throwaway's initdb, pg_ctl,
    postmaster and backends all run there (a folder already deleted reads as ``... (deleted)``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        cwd = cwd.removesuffix(" (deleted)")
        if (cwd == folder or cwd.startswith(folder + os.sep)) and alive(int(entry)):
            found.append(int(entry))
    return found


def _wait_gone(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def reap_throwaways(owner_pid: int | None = None, *, wait_s: float = 60) -> list[str]:
    """Stop and remove throwaway servers whose owner process is gone; returns the folders removed.

    A folder qualifies only by proof: it is named ``wb-pool-*`` in the temp folder, holds the
    ``owner.json`` that ``TooManyClients`` wrote, and its owner (the kernel that made it) is dead;
    with ``owner_pid``, only folders of that owner. Its demo subprocess gets ``wait_s`` seconds to
    finish its own cleanup (it is told by SIGTERM when its kernel dies), then SIGTERM, and is skipped
    while it still runs. Then every process working inside the folder (a server half started or
    half stopped, an initdb) gets SIGINT (PostgreSQL's fast shutdown), SIGKILL after 15 s, and the
    folder is removed. ``helpers run`` calls this for each notebook's kernel once it is gone.
    """
    removed = []
    root = tempfile.gettempdir()
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not name.startswith(THROWAWAY_PREFIX) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, OWNER_FILE)) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            continue  # no proof whose it is (or removed meanwhile): left alone
        if not isinstance(owner, dict) or owner.get("mark") != _OWNER_MARK:
            continue
        pid, child = owner.get("owner"), owner.get("child")
        if not isinstance(pid, int) or (owner_pid is not None and pid != owner_pid) or alive(pid):
            continue
        child = child if isinstance(child, int) and _runs_in_env(child, "WORKBOOK_STATE", folder) else None
        if child and not _wait_gone([child], wait_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGTERM)
            if not _wait_gone([child], min(wait_s, 30)):
                continue
        leftovers = _processes_in(folder)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGINT)
        if not _wait_gone(leftovers, 15):
            for p in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            _wait_gone(leftovers, 5)
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(folder):
                continue
            removed.append(folder)
    return removed
