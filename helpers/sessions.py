"""Several database sessions stepped through a scripted interleaving: the ``Scenario`` scheduler.

The contract (shared by chapters 03, 04, 06 and 08)::

    from helpers import Scenario
    sc = Scenario(
        name="lost_update",
        setup=["DROP TABLE IF EXISTS wb_isolation.t", "CREATE TABLE wb_isolation.t (id int PRIMARY KEY, v int)",
               "INSERT INTO wb_isolation.t VALUES (1, 10), (2, 20)"],      # run in autocommit before the sessions
        teardown=["DROP TABLE IF EXISTS wb_isolation.t"],                    # always run, even after errors
        sessions={
            "T1": {"isolation": "repeatable read",                          # optional; default read committed
                   "steps": {"b1": "BEGIN", "r1": "SELECT v FROM wb_isolation.t WHERE id = 1",
                             "w1": "UPDATE wb_isolation.t SET v = 11 WHERE id = 1", "c1": "COMMIT"}},
            "T2": {"steps": {"b2": "BEGIN", "w2": ("UPDATE wb_isolation.t SET v = %(v)s WHERE id = 1", {"v": 12}),
                             "c2": "COMMIT"}},
        },
        lock_timeout="3s",        # bound on every wait; must exceed deadlock_timeout (1 s) so deadlocks are 40P01
    )
    tr = sc.run(["b1", "b2", "r1", "w1", "w2", "c1", "c2"])   # step names are unique across sessions
    tr.df            # DataFrame: order, session, step, sql, rows, error (message), sqlstate, waited (bool),
                     #            blocked_by (list of session names), finished_after (step name that released it)
    tr.rows("r1")    # list of tuples returned by step r1 (None if it returned no result set)
    tr.value("r1")   # first column of the first row
    tr.sqlstate("w2")# SQLSTATE string ('40001', '40P01', '55P03', '57014', ...) or None
    tr.waited("w2")  # True when the step was blocked (decided by pg_blocking_pids, never by a sleep)
    tr               # rich display: one column per session, rows in issue order, blocked steps marked

Semantics (as PostgreSQL's isolation tester): each session has its own connection (psycopg 3,
autocommit at the driver level so BEGIN/COMMIT in steps control transactions explicitly), its own
application_name ``wb_scenario_<name>_<session>``. A step is sent asynchronously; the scheduler polls the
server until the step either completes or its backend appears in pg_blocking_pids-based wait (then it is
marked waited/blocked_by and the scheduler moves on to the next step of the permutation). A step of a
session whose previous step is still blocked waits for it. When a later step releases the blocker, the
blocked step's result is collected (order of completion recorded). Steps after an error in a session run
normally (they usually fail with 25P02 until ROLLBACK/COMMIT, as in psql). Every wait is bounded by
lock_timeout and statement_timeout; at the end every connection is closed and nothing (connection, open
transaction, lock) remains.

Details that make a transcript the same on every run:

- After each step the scheduler *settles*: it waits until the step and every earlier blocked step is
  either finished or stably blocked by a backend (a backend that is neither is still running, so it
  looks again). Steps released together are recorded in issue order, after the step that released them.
- When the blocked steps form a cycle (a deadlock), it keeps waiting until PostgreSQL's deadlock
  detector breaks it (after ``deadlock_timeout``), so the victim is always decided before the next step.
- ``Transcript.df`` also has ``issued`` (position in the permutation) and ``status`` (command tag).
- ``finished_after`` is None for a blocked step that was not released but ended by the server
  (40P01 deadlock victim, 55P03 lock_timeout, 57014 statement_timeout).
- The scheduler's own connection is named ``wb_scheduler_<name>``; it runs setup/teardown and the
  pg_blocking_pids polls, and after the sessions close it waits until their backends are gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import html
import time
from dataclasses import dataclass, field

import pandas as pd
import psycopg

from .database import psycopg_conninfo

_ENDED_BY_SERVER = ("40P01", "55P03", "57014")
ISOLATION_LEVELS = ("read uncommitted", "read committed", "repeatable read", "serializable")
_POLL_SQL = """
SELECT p, pg_blocking_pids(p), pg_safe_snapshot_blocking_pids(p)
FROM unnest(%s::int[]) AS p
"""


class ScenarioError(RuntimeError):
    """The scenario itself is wrong (unknown step, bad isolation level) or a wait exceeded every bound."""


@dataclass
class StepResult:
    """What one step did: its rows or error, and whether (and on whom) it waited."""

    step: str
    session: str
    sql: str
    issued: int
    order: int | None = None
    rows: list[tuple] | None = None
    status: str | None = None
    error: str | None = None
    sqlstate: str | None = None
    waited: bool = False
    blocked_by: list[str] = field(default_factory=list)
    finished_after: str | None = None
    params: object = None

    def shown_sql(self) -> str:
        """The SQL with its parameters written in, for display only (never executed)."""
        one = " ".join(self.sql.split())
        try:
            if isinstance(self.params, dict):
                return one % {k: repr(v) for k, v in self.params.items()}
            if isinstance(self.params, (list, tuple)):
                return one % tuple(repr(v) for v in self.params)
        except (TypeError, ValueError, KeyError):
            pass
        return one


class Transcript:
    """The outcome of ``Scenario.run``: ``.df``, accessors per step, and a T1/T2 column display."""

    COLUMNS = [
        "order",
        "session",
        "step",
        "sql",
        "rows",
        "error",
        "sqlstate",
        "waited",
        "blocked_by",
        "finished_after",
        "issued",
        "status",
    ]

    def __init__(
        self,
        name: str,
        sessions: list[str],
        permutation: list[str],
        results: dict[str, StepResult],
        events: list[tuple[str, str]],
    ):
        self.name = name
        self.sessions = sessions
        self.permutation = permutation
        self.results = results
        self.events = events  # ("issue" | "block" | "finish", step) in the order they happened

    @property
    def df(self) -> pd.DataFrame:
        rows = [[getattr(r, c) for c in self.COLUMNS] for r in self.results.values()]
        df = pd.DataFrame(rows, columns=self.COLUMNS, dtype=object)
        df = df.astype({"order": "int64", "issued": "int64", "waited": bool})
        return df.sort_values("order", kind="stable").reset_index(drop=True)

    def _r(self, step: str) -> StepResult:
        if step not in self.results:
            raise KeyError(f"step {step!r} was not part of this run; steps: {list(self.results)}")
        return self.results[step]

    def rows(self, step: str) -> list[tuple] | None:
        """Rows returned by ``step`` (None when it returned no result set or failed)."""
        return self._r(step).rows

    def value(self, step: str):
        """First column of the first row of ``step`` (None when there is none)."""
        rows = self._r(step).rows
        return rows[0][0] if rows else None

    def sqlstate(self, step: str) -> str | None:
        """SQLSTATE of the error ``step`` raised, None when it succeeded."""
        return self._r(step).sqlstate

    def error(self, step: str) -> str | None:
        """First line of the error message of ``step``, None when it succeeded."""
        return self._r(step).error

    def waited(self, step: str) -> bool:
        """True when the server showed ``step`` blocked (pg_blocking_pids) before it finished."""
        return self._r(step).waited

    def blocked_by(self, step: str) -> list[str]:
        """Sessions that blocked ``step`` when it was first seen waiting."""
        return list(self._r(step).blocked_by)

    def signature(self) -> list[tuple]:
        """Everything a run observed, as plain tuples (two runs behaved alike iff these are equal)."""
        return [tuple(_hashable(v) for v in row) for row in self.df.itertuples(index=False, name=None)]

    # -- display ---------------------------------------------------------------------------------------
    def _cells(self, n: int = 48) -> list[tuple[str, str, str]]:
        """(session, text, kind) per event, kind in ok / error / blocked / done; SQL cut at ``n`` characters."""
        out = []
        for kind, step in self.events:
            r = self.results[step]
            if kind == "issue":
                continue
            if kind == "block":
                who = ", ".join(r.blocked_by) or "another backend"
                out.append((r.session, f"{step}: {_short(r.shown_sql(), n)}  ⏳ blocked by {who}", "blocked"))
            else:
                head = f"{step}: {_short(r.shown_sql(), n)}"
                if r.waited:
                    head = f"{step}: … " + (
                        f"completed after {r.finished_after}" if r.finished_after else "ended by the server"
                    )
                out.append(
                    (
                        r.session,
                        f"{head}  {_short(_outcome(r), max(n, 60))}",
                        "error" if r.sqlstate else ("done" if r.waited else "ok"),
                    )
                )
        return out

    def __repr__(self) -> str:
        cells = self._cells()
        width = {s: max([len(s)] + [len(t) for ss, t, _ in cells if ss == s]) for s in self.sessions}
        width = {s: min(w, 72) for s, w in width.items()}
        lines = [f"Scenario {self.name!r}", "    " + " | ".join(s.ljust(width[s]) for s in self.sessions)]
        for i, (sess, txt, _) in enumerate(cells, 1):
            txt = txt[:72]
            parts = [
                (txt if s == sess else "").ljust(width[s])[: max(width[s], len(txt)) if s == sess else width[s]]
                for s in self.sessions
            ]
            lines.append(f"{i:>3} " + " | ".join(parts).rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colors = {
            "ok": "",
            "done": "background:#e8f4e8",
            "blocked": "background:#fff3cd",
            "error": "background:#f8d7da",
        }
        head = "".join(f"<th style='text-align:left'>{html.escape(s)}</th>" for s in self.sessions)
        body = []
        for i, (sess, txt, kind) in enumerate(self._cells(200), 1):
            tds = "".join(
                f"<td style='text-align:left;font-family:monospace;{colors[kind]}'>{html.escape(txt)}</td>"
                if s == sess
                else "<td></td>"
                for s in self.sessions
            )
            body.append(f"<tr><td>{i}</td>{tds}</tr>")
        return (
            f"<div><b>Scenario {html.escape(self.name)}</b><table><thead><tr><th>#</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, float) and v != v:
        return None
    return v


def _short(sql: str, n: int = 48) -> str:
    one = " ".join(sql.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def _outcome(r: StepResult) -> str:
    if r.sqlstate:
        return f"✗ {r.sqlstate} {r.error or ''}".strip()
    if r.rows is not None:
        shown = r.rows[:3]
        more = f" +{len(r.rows) - 3}" if len(r.rows) > 3 else ""
        return f"→ {shown}{more}"
    return f"✓ {r.status}" if r.status else "✓"


@dataclass
class _Session:
    name: str
    isolation: str | None
    steps: dict[str, tuple[str, object]]
    conn: psycopg.Connection | None = None
    pid: int | None = None
    pool: cf.ThreadPoolExecutor | None = None
    current: tuple[StepResult, cf.Future] | None = None


def _execute(conn: psycopg.Connection, sql: str, params) -> tuple:
    """Run one step on its connection (in the session's thread): rows, command tag, error, SQLSTATE."""
    try:
        cur = conn.execute(sql, params) if params is not None else conn.execute(sql)
        rows = [tuple(r) for r in cur.fetchall()] if cur.description is not None else None
        return rows, cur.statusmessage, None, None
    except psycopg.Error as exc:
        msg = (getattr(exc.diag, "message_primary", None) or str(exc)).strip().splitlines()
        return None, None, (msg[0] if msg else type(exc).__name__), exc.sqlstate


class Scenario:
    """Setup SQL, named sessions with named steps, teardown SQL; ``run(permutation)`` returns a Transcript."""

    def __init__(
        self,
        name: str,
        setup=(),
        teardown=(),
        sessions: dict | None = None,
        *,
        lock_timeout: str = "3s",
        statement_timeout: str = "10s",
        database: str | None = None,
    ):
        if not name.replace("_", "").isalnum():
            raise ScenarioError(f"scenario name must be letters, digits and underscores: {name!r}")
        self.name = name
        self.setup = [setup] if isinstance(setup, str) else list(setup)
        self.teardown = [teardown] if isinstance(teardown, str) else list(teardown)
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.database = database
        self.pids: dict[str, int] = {}  # session -> backend pid of the last run (for leftover checks)
        self.sessions: dict[str, dict] = {}
        self._step_session: dict[str, str] = {}
        for sname, spec in (sessions or {}).items():
            app = self.application_name(sname)
            if len(app) > 63:
                raise ScenarioError(f"application_name {app!r} is longer than 63 bytes: use shorter names")
            iso = spec.get("isolation")
            if iso is not None and iso.lower() not in ISOLATION_LEVELS:
                raise ScenarioError(f"session {sname}: isolation must be one of {ISOLATION_LEVELS}, not {iso!r}")
            steps = {}
            for step, body in spec["steps"].items():
                if step in self._step_session:
                    raise ScenarioError(f"step name {step!r} is used by {self._step_session[step]} and {sname}")
                self._step_session[step] = sname
                steps[step] = (body, None) if isinstance(body, str) else (body[0], body[1])
            self.sessions[sname] = {"isolation": iso.lower() if iso else None, "steps": steps}

    def application_name(self, session: str) -> str:
        """``wb_scenario_<name>_<session>``: how the server knows a session of this scenario."""
        return f"wb_scenario_{self.name}_{session}"

    @property
    def steps(self) -> list[str]:
        """All step names, session by session."""
        return list(self._step_session)

    # -- running ---------------------------------------------------------------------------------------
    def run(self, permutation=None) -> Transcript:
        """Run setup, the steps in ``permutation`` order (default: session by session), teardown."""
        perm = list(permutation) if permutation is not None else self.steps
        unknown = [s for s in perm if s not in self._step_session]
        if unknown:
            raise ScenarioError(f"unknown steps {unknown}; this scenario has {self.steps}")
        if len(set(perm)) != len(perm):
            raise ScenarioError(f"a step may appear once in a permutation: {perm}")
        self._results: dict[str, StepResult] = {}
        self._events: list[tuple[str, str]] = []
        self._order = 0
        conninfo = psycopg_conninfo(self.database)
        admin = psycopg.connect(**conninfo, autocommit=True, application_name=f"wb_scheduler_{self.name}"[:63])
        self._admin = admin
        sessions = {n: _Session(n, s["isolation"], s["steps"]) for n, s in self.sessions.items()}
        self._sessions = sessions
        try:
            self._set_bounds(admin)
            superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            for stmt in self.setup:
                admin.execute(stmt)
            for i, s in enumerate(sessions.values()):
                s.conn = psycopg.connect(
                    **conninfo, autocommit=True, prepare_threshold=None, application_name=self.application_name(s.name)
                )
                self._set_bounds(s.conn)
                if superuser:
                    self._stagger_deadlock_timeout(s.conn, i)
                if s.isolation:
                    s.conn.execute("SELECT set_config('default_transaction_isolation', %s, false)", (s.isolation,))
                s.pid = s.conn.info.backend_pid
                s.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wb_{self.name}_{s.name}")
            self._pids = {s.pid: s.name for s in sessions.values()}
            self.pids = {s.name: s.pid for s in sessions.values()}
            for step in perm:
                self._issue(step)
            for s in sessions.values():  # steps still blocked at the end: their bounds will end them
                if s.current:
                    self._finish(s.current, "end")
            self._settle("end")
        finally:
            self._close(sessions)
            try:
                for stmt in self.teardown:
                    admin.execute(stmt)
            finally:
                admin.close()
        return Transcript(self.name, list(self.sessions), perm, {s: self._results[s] for s in perm}, self._events)

    def _set_bounds(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', '60s', false)",
            (self.lock_timeout, self.statement_timeout),
        )

    def _stagger_deadlock_timeout(self, conn: psycopg.Connection, index: int) -> None:
        """Deadlock victim by declaration order, not by a race between the waiters' timers.

        Each waiting backend runs the deadlock check ``deadlock_timeout`` after it began to wait, and the
        one that finds the cycle is the victim. Two waiters that began a few ms apart race under load; giving
        the i-th declared session 1 s + 0.3 s * i makes the earliest declared session of a cycle the victim
        on every run. Superuser only (as the setting is); kept below lock_timeout so deadlocks stay 40P01.
        """
        ms = 1000 + 300 * index
        if ms + 500 <= _seconds(self.lock_timeout) * 1000:
            conn.execute("SELECT set_config('deadlock_timeout', %s, false)", (f"{ms}ms",))

    def _deadline(self) -> float:
        return time.monotonic() + _seconds(self.statement_timeout) + 10.0

    def _issue(self, step: str) -> None:
        sess = self._sessions[self._step_session[step]]
        if sess.current is not None:  # the session's previous step is still blocked: wait for it
            self._finish(sess.current, step)
            self._settle(step)
        sql, params = sess.steps[step]
        res = StepResult(step=step, session=sess.name, sql=sql, issued=len(self._results) + 1, params=params)
        self._results[step] = res
        self._events.append(("issue", step))
        fut = sess.pool.submit(_execute, sess.conn, sql, params)
        sess.current = (res, fut)
        self._wait_stable([sess.current])
        if res.waited:
            self._events.append(("block", step))
        else:
            self._complete(sess, step)
        self._settle(step)

    def _waiting(self) -> list[tuple[StepResult, cf.Future]]:
        return sorted((s.current for s in self._sessions.values() if s.current), key=lambda c: c[0].issued)

    def _poll(self, pending) -> dict[int, list[int]]:
        """pid -> pids blocking it (lock waits and safe-snapshot waits), for the pending steps' backends."""
        pids = [self._sessions[r.session].pid for r, _ in pending]
        rows = self._admin.execute(_POLL_SQL, (pids,)).fetchall()
        return {p: sorted(set(a or []) | set(b or [])) for p, a, b in rows}

    def _wait_stable(self, pending) -> None:
        """Wait until each pending step is done or blocked by some backend (never decided by a timer)."""
        deadline, delay = self._deadline(), 0.0005
        while True:
            running = [c for c in pending if not c[1].done()]
            if not running:
                return
            blockers = self._poll(running)
            unsettled = []
            for res, fut in running:
                by = blockers.get(self._sessions[res.session].pid) or []
                if by and not fut.done():
                    if not res.waited:
                        res.waited = True
                        res.blocked_by = sorted({self._pids.get(p, f"pid {p}") for p in by})
                elif not fut.done():
                    unsettled.append(fut)
            if not unsettled:
                return
            if time.monotonic() > deadline:
                self._cancel_all()
                raise ScenarioError(f"scenario {self.name!r}: a step ran past every bound")
            cf.wait(unsettled, timeout=delay, return_when=cf.FIRST_COMPLETED)
            delay = min(delay * 2, 0.02)

    def _cycle(self, pending) -> bool:
        """True when the blocked steps wait for each other in a cycle (a deadlock not yet broken)."""
        blockers = self._poll(pending)
        graph = {
            self._sessions[r.session].pid: set(blockers.get(self._sessions[r.session].pid) or []) for r, _ in pending
        }
        for start in graph:
            seen, frontier = set(), set(graph[start])
            while frontier:
                p = frontier.pop()
                if p == start:
                    return True
                if p in seen or p not in graph:
                    continue
                seen.add(p)
                frontier |= graph[p]
        return False

    def _settle(self, after: str) -> None:
        """Collect every blocked step that a finished step released, in issue order, until nothing moves."""
        deadline = self._deadline()
        while True:
            pending = self._waiting()
            if not pending:
                return
            self._wait_stable(pending)
            done = [(r, f) for r, f in pending if f.done()]
            if done:
                for r, _ in done:
                    self._complete(self._sessions[r.session], r.step, after)
                continue
            if not self._cycle(pending):
                return
            if time.monotonic() > deadline:
                self._cancel_all()
                raise ScenarioError(f"scenario {self.name!r}: a deadlock was not broken within the bounds")
            cf.wait([f for _, f in pending], timeout=0.02, return_when=cf.FIRST_COMPLETED)

    def _finish(self, current, after: str) -> None:
        """Wait (bounded by the server's timeouts) until a blocked step finishes, then record it."""
        res, fut = current
        try:
            fut.result(timeout=_seconds(self.statement_timeout) + 10.0)
        except cf.TimeoutError:
            self._cancel_all()
            raise ScenarioError(f"scenario {self.name!r}: step {res.step} ran past every bound") from None
        self._complete(self._sessions[res.session], res.step, after)

    def _complete(self, sess: _Session, step: str, after: str | None = None) -> None:
        res, fut = sess.current
        assert res.step == step
        res.rows, res.status, res.error, res.sqlstate = fut.result()
        self._order += 1
        res.order = self._order
        if res.waited and res.sqlstate in _ENDED_BY_SERVER:
            after = None  # not released: the deadlock detector, lock_timeout or statement_timeout ended it
        elif res.waited:
            if after == step:  # released by something that finished meanwhile (e.g. a deadlock victim)
                after = next((st for kind, st in reversed(self._events) if kind == "finish"), None)
            res.finished_after = after
        sess.current = None
        self._events.append(("finish", step))

    def _cancel_all(self) -> None:
        for s in self._sessions.values():
            if s.current and s.conn is not None:
                try:
                    s.conn.cancel_safe(timeout=2.0)
                except Exception:  # noqa: BLE001 - best effort before closing
                    pass

    def _close(self, sessions: dict[str, _Session]) -> None:
        """Close every session connection and wait until the server has let go of their backends."""
        for s in sessions.values():
            if s.current:
                self._cancel_all()
                break
        for s in sessions.values():
            if s.pool is not None:
                s.pool.shutdown(wait=True)
            if s.conn is not None:
                s.conn.close()
        pids = [s.pid for s in sessions.values() if s.pid is not None]
        deadline = time.monotonic() + 10.0
        while pids and time.monotonic() < deadline:
            left = self._admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
                "UNION ALL SELECT count(*) FROM pg_locks WHERE pid = ANY(%s)",
                (pids, pids),
            ).fetchall()
            if not any(n for (n,) in left):
                return
            time.sleep(0.002)  # waiting for backends to exit, not deciding anything


def _seconds(value: str) -> float:
    """'3s' / '500ms' / '2min' / '3000' (ms, PostgreSQL's default unit) -> seconds."""
    v = str(value).strip().lower()
    for unit, factor in (("ms", 0.001), ("min", 60.0), ("s", 1.0), ("h", 3600.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)].strip()) * factor
    return float(v) / 1000.0
