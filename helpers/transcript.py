"""The text forms of a ``Scenario``: the ordered script it reads (``parse_script``), and what one run observed
(``StepResult`` per step, the ``Transcript`` of the run).

A ``Transcript`` is the run's result object (the ``Scenario`` is only the spec): ``.df``, accessors
per step (``rows``, ``value``, ``sqlstate``, ``error``, ``waited``, ``blocked_by``), the backends it
used (``pids``, so a caller can prove none is left) and a display with one column per session.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd

_LINE = re.compile(r"(?P<who>[A-Za-z][A-Za-z0-9_]*)\s*:\s?(?P<sql>.*)$")
_LABEL = re.compile(r"\s*--\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*$")


class ScenarioError(RuntimeError):
    """The scenario itself is wrong (unknown step, bad isolation level) or a wait exceeded every bound."""


def parse_script(script: str) -> tuple[list[str], list[str], list[tuple[str, str, str]]]:
    """``(setup, teardown, [(session, step name, SQL), ...])`` of an ordered script, in line order."""
    entries: list[list[str]] = []  # [who, text]; who is a session, "setup" or "teardown"
    indent = 0  # of the last step line: a line indented deeper continues it
    for n, raw in enumerate(script.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        depth = len(raw) - len(raw.lstrip())
        if entries and depth > indent:  # continues the line above
            entries[-1][1] = f"{entries[-1][1]}\n{raw.strip()}"
            continue
        m = _LINE.match(raw.strip())
        if not m:
            raise ScenarioError(f"line {n}: expected '<session>: <SQL>' (or setup:/teardown:), got {raw.strip()!r}")
        who, indent = m.group("who"), depth
        entries.append([who.lower() if who.lower() in ("setup", "teardown") else who, m.group("sql").strip()])
    setup = [text for who, text in entries if who == "setup"]
    teardown = [text for who, text in entries if who == "teardown"]
    steps, counts = [], {}
    for who, text in entries:
        if who in ("setup", "teardown"):
            continue
        label = _LABEL.search(text)
        counts[who] = counts.get(who, 0) + 1
        name = label.group("label") if label else f"{who.lower()}_{counts[who]}"
        steps.append((who, name, text[: label.start()].rstrip() if label else text))
    return setup, teardown, steps


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
    """The outcome of ``Scenario.run``: ``.df``, accessors per step, the run's backends, a T1/T2 column display."""

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
        pids: dict[str, int] | None = None,
        application_names: dict[str, str] | None = None,
    ):
        self.name = name
        self.pids = dict(pids or {})  # session -> backend pid of this run (to prove nothing is left)
        self.application_names = dict(application_names or {})  # session -> application_name
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
