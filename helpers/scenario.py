"""Several database sessions stepped through a scripted interleaving: the ``Scenario`` scheduler.

A scenario is written as PostgreSQL's isolation tester and Hermitage write theirs: setup, sessions,
steps, and the order the steps are issued. The shortest form is an ordered script, one step a line,
so the line order *is* the permutation::

    from helpers import Scenario
    sc = Scenario.from_script("lost_update", '''
        setup: CREATE TABLE t (id int PRIMARY KEY, v int)
        setup: INSERT INTO t VALUES (1, 10), (2, 20)
        T1: BEGIN
        T2: BEGIN
        T1: SELECT v FROM t WHERE id = 1      -- r1
        T2: SELECT v FROM t WHERE id = 1      -- r2
        T1: UPDATE t SET v = 11 WHERE id = 1  -- w1
        T2: UPDATE t SET v = 11 WHERE id = 1  -- w2
        T1: COMMIT
        T2: COMMIT
        teardown: DROP TABLE t
    ''', schema="wb_locking_k123_ab12cd34", isolation="repeatable read")
    tr = sc.run()          # the script's order; sc.run([...]) runs another permutation of the same steps
    tr.waited("w2"), tr.sqlstate("w2"), tr.value("r1")

Script lines: ``<session>: <SQL>`` is a step, ``setup: <SQL>`` / ``teardown: <SQL>`` run on the
scheduler's own connection (teardown always, even after errors); a line indented deeper than the
step above continues it; blank lines and lines starting with ``#`` are skipped. A trailing ``-- name`` (one word)
names the step; an unnamed step is ``<session>_<n>``, the n-th line of its session (``t1_1``, ``t2_3``).
Values are bound, never written in: a step containing ``%(key)s`` runs with ``params``. Names of
tables go through ``psycopg.sql.Identifier``: ``names={"t": "g0_rc"}`` fills ``{t}`` in every
statement, and ``schema=`` puts every connection's ``search_path`` on that schema.

The dictionary form (``Scenario(name, setup, teardown, sessions={"T1": {"isolation": ..., "steps":
{"r1": "SELECT ...", "w1": ("UPDATE ... %(v)s", {"v": 1})}}})``) says the same; ``run(permutation)``.

Semantics, as PostgreSQL's isolation tester: each session has its own connection (autocommit at the
driver, so BEGIN/COMMIT steps control transactions) named ``wb_scenario_<name>_<session>``. A step is
sent asynchronously; the scheduler polls the server until it completes or is blocked by **another
session of this scenario** (``pg_blocking_pids`` and ``pg_safe_snapshot_blocking_pids`` filtered to the
scenario's backends: a wait on an outside backend is not in the script and counts as running), marks
it ``waited``/``blocked_by`` and moves on; a session's next step waits for its blocked one. After each
step it *settles* (every pending step finished or stably blocked; steps released together are recorded
in issue order, after the step that released them); a deadlock is left to PostgreSQL's detector, so the
victim is decided before the next step. ``finished_after`` is None for a blocked step the server ended
(40P01, 55P03, 57014). Steps after an error run normally (25P02 until ROLLBACK). Every wait is bounded by
lock_timeout and statement_timeout, and at the end nothing (connection, transaction, lock) remains.
The spec holds no state of a run: each ``run`` makes a ``_Run`` and returns its ``Transcript``
(``helpers.transcript``), which also knows the backends it used (``pids``).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .database import psycopg_conninfo
from .transcript import ScenarioError, StepResult, Transcript, parse_script

__all__ = ["ISOLATION_LEVELS", "Scenario", "ScenarioError", "StepResult", "Transcript", "parse_script"]

_ENDED_BY_SERVER = ("40P01", "55P03", "57014")
#: PostgreSQL's four isolation levels, weakest first (the one definition in the workbook)
ISOLATION_LEVELS = ("read uncommitted", "read committed", "repeatable read", "serializable")
_POLL_SQL = """
SELECT p, pg_blocking_pids(p), pg_safe_snapshot_blocking_pids(p)
FROM unnest(%s::int[]) AS p
"""


class Scenario:
    """Setup SQL, named sessions with named steps, teardown SQL; ``run(permutation)`` returns a Transcript.

    The spec only: nothing about a run is kept here (``run`` returns everything it observed).
    """

    def __init__(
        self,
        name: str,
        setup=(),
        teardown=(),
        sessions: dict | None = None,
        *,
        permutation=None,
        lock_timeout: str = "3s",
        statement_timeout: str = "10s",
        database: str | None = None,
        schema: str | None = None,
        names: dict | None = None,
    ):
        if not name.replace("_", "").isalnum():
            raise ScenarioError(f"scenario name must be letters, digits and underscores: {name!r}")
        self.name = name
        self.setup = [setup] if isinstance(setup, str) else list(setup)
        self.teardown = [teardown] if isinstance(teardown, str) else list(teardown)
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.database = database
        self.schema = schema
        self.names = dict(names or {})
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
        self.permutation = list(permutation) if permutation is not None else None
        if self.permutation is not None:
            self._check(self.permutation)

    @classmethod
    def from_script(
        cls,
        name: str,
        script: str,
        *,
        setup=(),
        teardown=(),
        isolation: str | dict | None = None,
        params: dict | None = None,
        **options,
    ) -> Scenario:
        """A scenario from ordered lines ``T1: UPDATE ...`` (see the module's docstring): line order is the order run.

        ``isolation``: one level for every session, or ``{session: level}``. ``params``: bound values for
        the steps that contain ``%(key)s``. ``setup``/``teardown`` run before the script's own lines.
        Other keywords (``schema``, ``names``, ``lock_timeout``, ``database``) as for ``Scenario``.
        """
        own_setup, own_teardown, steps = parse_script(script)
        sessions: dict[str, dict] = {}
        for who, step, body in steps:
            level = isolation.get(who) if isinstance(isolation, dict) else isolation
            spec = sessions.setdefault(who, {"steps": {}, **({"isolation": level} if level else {})})
            if step in spec["steps"] or any(step in s["steps"] for s in sessions.values()):
                raise ScenarioError(f"step name {step!r} is used twice in the script")
            spec["steps"][step] = (body, params) if params is not None and "%(" in body else body
        setup = [setup] if isinstance(setup, str) else list(setup)
        teardown = [teardown] if isinstance(teardown, str) else list(teardown)
        return cls(
            name,
            [*setup, *own_setup],
            [*own_teardown, *teardown],
            sessions,
            permutation=[step for _, step, _ in steps],
            **options,
        )

    def application_name(self, session: str) -> str:
        """``wb_scenario_<name>_<session>``: how the server knows a session of this scenario."""
        return f"wb_scenario_{self.name}_{session}"

    @property
    def steps(self) -> list[str]:
        """All step names, session by session."""
        return list(self._step_session)

    def session_of(self, step: str) -> str:
        return self._step_session[step]

    def _check(self, perm: list[str]) -> None:
        unknown = [s for s in perm if s not in self._step_session]
        if unknown:
            raise ScenarioError(f"unknown steps {unknown}; this scenario has {self.steps}")
        if len(set(perm)) != len(perm):
            raise ScenarioError(f"a step may appear once in a permutation: {perm}")

    def script(self, permutation=None) -> str:
        """The scenario as an ordered script (what ``from_script`` reads), in ``permutation`` order."""
        perm = list(permutation) if permutation is not None else (self.permutation or self.steps)
        lines = [f"setup: {s}" for s in self.setup]
        for step in perm:
            who = self._step_session[step]
            first, *more = self.sessions[who]["steps"][step][0].splitlines() or [""]
            lines.append(f"{who}: {first}" + "".join(f"\n    {m}" for m in more) + f"  -- {step}")
        lines += [f"teardown: {s}" for s in self.teardown]
        return "\n".join(lines)

    def run(self, permutation=None) -> Transcript:
        """Run setup, the steps in ``permutation`` order (default: the script's order, else session by
        session), teardown; returns the run's ``Transcript``."""
        perm = list(permutation) if permutation is not None else (self.permutation or self.steps)
        self._check(perm)
        return _Run(self, perm).execute()


@dataclass
class _Session:
    name: str
    isolation: str | None
    steps: dict[str, tuple[str, object]]
    conn: psycopg.Connection | None = None
    pid: int | None = None
    pool: cf.ThreadPoolExecutor | None = None
    current: tuple[StepResult, cf.Future] | None = None


def _execute(conn: psycopg.Connection, query: str, params) -> tuple:
    """Run one step on its connection (in the session's thread): rows, command tag, error, SQLSTATE."""
    try:
        cur = conn.execute(query, params) if params is not None else conn.execute(query)
        rows = [tuple(r) for r in cur.fetchall()] if cur.description is not None else None
        return rows, cur.statusmessage, None, None
    except psycopg.Error as exc:
        msg = (getattr(exc.diag, "message_primary", None) or str(exc)).strip().splitlines()
        return None, None, (msg[0] if msg else type(exc).__name__), exc.sqlstate


class _Run:
    """One run of a scenario: its connections, threads and observations (the spec stays untouched)."""

    def __init__(self, spec: Scenario, perm: list[str]):
        self.spec, self.perm = spec, perm
        self.name = spec.name
        self.lock_timeout, self.statement_timeout = spec.lock_timeout, spec.statement_timeout
        self._results: dict[str, StepResult] = {}
        self._events: list[tuple[str, str]] = []
        self._order = 0
        self._pids: dict[int, str] = {}

    def _sql(self, text: str) -> str:
        """``text`` with ``{name}`` filled by quoted identifiers (``spec.names``), as a plain string."""
        if not self.spec.names:
            return text
        idents = {
            k: sql.Identifier(*v) if isinstance(v, (tuple, list)) else sql.Identifier(v)
            for k, v in self.spec.names.items()
        }
        return sql.SQL(text).format(**idents).as_string(self._admin)

    def execute(self) -> Transcript:
        spec = self.spec
        conninfo = psycopg_conninfo(spec.database)
        admin = psycopg.connect(**conninfo, autocommit=True, application_name=f"wb_scheduler_{self.name}"[:63])
        self._admin = admin
        sessions = {
            n: _Session(n, s["isolation"], {k: (self._sql(q), p) for k, (q, p) in s["steps"].items()})
            for n, s in spec.sessions.items()
        }
        self._sessions = sessions
        try:
            self._set_bounds(admin)
            superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            for stmt in spec.setup:
                admin.execute(self._sql(stmt))
            for i, s in enumerate(sessions.values()):
                s.conn = psycopg.connect(
                    **conninfo, autocommit=True, prepare_threshold=None, application_name=spec.application_name(s.name)
                )
                self._set_bounds(s.conn)
                if superuser:
                    self._stagger_deadlock_timeout(s.conn, i)
                if s.isolation:
                    s.conn.execute("SELECT set_config('default_transaction_isolation', %s, false)", (s.isolation,))
                s.pid = s.conn.info.backend_pid
                s.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wb_{self.name}_{s.name}")
            self._pids = {s.pid: s.name for s in sessions.values()}
            for step in self.perm:
                self._issue(step)
            for s in sessions.values():  # steps still blocked at the end: their bounds will end them
                if s.current:
                    self._finish(s.current, "end")
            self._settle("end")
        finally:
            self._close(sessions)
            try:
                for stmt in spec.teardown:
                    admin.execute(self._sql(stmt))
            finally:
                admin.close()
        return Transcript(
            self.name,
            list(spec.sessions),
            self.perm,
            {s: self._results[s] for s in self.perm},
            self._events,
            pids={s.name: s.pid for s in sessions.values()},
            application_names={n: spec.application_name(n) for n in spec.sessions},
        )

    def _set_bounds(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', '60s', false)",
            (self.lock_timeout, self.statement_timeout),
        )
        if self.spec.schema:
            path = sql.Identifier(self.spec.schema).as_string(conn)
            conn.execute("SELECT set_config('search_path', %s, false)", (path,))

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
        sess = self._sessions[self.spec.session_of(step)]
        if sess.current is not None:  # the session's previous step is still blocked: wait for it
            self._finish(sess.current, step)
            self._settle(step)
        query, params = sess.steps[step]
        res = StepResult(step=step, session=sess.name, sql=query, issued=len(self._results) + 1, params=params)
        self._results[step] = res
        self._events.append(("issue", step))
        fut = sess.pool.submit(_execute, sess.conn, query, params)
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
                # only the scenario's own sessions count: a wait on an outside backend is not in the script
                by = [p for p in blockers.get(self._sessions[res.session].pid) or [] if p in self._pids]
                if by and not fut.done():
                    if not res.waited:
                        res.waited = True
                        res.blocked_by = sorted({self._pids[p] for p in by})
                elif not fut.done():
                    unsettled.append(fut)
            if not unsettled:
                return
            if time.monotonic() > deadline:
                self._cancel_all()
                raise ScenarioError(f"scenario {self.name!r}: a step ran past every bound")
            cf.wait(unsettled, timeout=delay, return_when=cf.FIRST_COMPLETED)
            delay = min(delay * 2, 0.02)

    def _cycle(self, pending, blockers=None) -> bool:
        """True when the blocked steps wait for each other in a cycle (a deadlock not yet broken)."""
        blockers = self._poll(pending) if blockers is None else blockers
        graph = {
            self._sessions[r.session].pid: {
                p for p in blockers.get(self._sessions[r.session].pid) or [] if p in self._pids
            }
            for r, _ in pending
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
            # one snapshot decides: a step that is neither done nor waiting on a session of the script is
            # still running (a deadlock victim being ended, its waiter being granted): not settled yet
            blockers = self._poll(pending)
            running = [
                r
                for r, f in pending
                if not f.done() and not any(p in self._pids for p in blockers.get(self._sessions[r.session].pid) or [])
            ]
            if running:
                cf.wait([f for _, f in pending], timeout=0.02, return_when=cf.FIRST_COMPLETED)
                if time.monotonic() > deadline:
                    self._cancel_all()
                    raise ScenarioError(f"scenario {self.name!r}: step {running[0].step} ran past every bound")
                continue
            if not self._cycle(pending, blockers):
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
