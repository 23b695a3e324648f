"""EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) to a node table, a text plan and a picture.

``explain(stmt)`` runs the statement under EXPLAIN inside a transaction that is always rolled
back (so explaining an UPDATE or DELETE changes nothing) and returns a :class:`Plan`: a node
table in the spirit of PEV2 / explain.depesz.com (exclusive time per node, signed misestimate
factor, buffers), the plain text plan, a rich Jupyter display and a matplotlib figure.
``compare(before, after)`` shows two plans side by side with the speed-up. The text lives in
``plantext`` and the HTML display, figures and ``Comparison`` in ``planview``.

Exclusive time is inclusive time minus what the node's children took, where "inclusive" is
loop-corrected (per-loop time x loops) and divided among parallel processes under a Gather.
Children are charged to the node that really ran them: a CTE to the CTE Scan that pulled it,
an InitPlan to the node that reads its value. Works on the JSON of PostgreSQL 13 to 18
(18 reports fractional actual rows and a ``Disabled`` flag instead of a disable cost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy import Connection, Engine, text
from sqlalchemy.sql import ClauseElement

from .plantext import render_text
from .planview import HOT, Comparison, _records, compare, plan_figure, plan_html

__all__ = [
    "COLUMNS",
    "HOT",
    "Comparison",
    "Plan",
    "compare",
    "explain",
    "from_json",
    "misestimate_factor",
    "plan_figure",
    "plan_html",
    "render_text",
]

COLUMNS = [
    "id",
    "parent",
    "depth",
    "node_type",
    "relation",
    "alias",
    "index",
    "join_type",
    "strategy",
    "relationship",
    "subplan",
    "parallel",
    "plan_rows",
    "actual_rows",
    "actual_rows_total",
    "loops",
    "misestimate",
    "estimate",
    "startup_cost",
    "total_cost",
    "disabled",
    "inclusive_ms",
    "exclusive_ms",
    "exclusive_pct",
    "shared_hit",
    "shared_read",
    "shared_dirtied",
    "temp_read",
    "temp_written",
    "rows_removed_by_filter",
    "rows_removed_by_recheck",
    "heap_fetches",
    "index_searches",  # PostgreSQL 18+: descents into the index (a skip scan makes several); None before
    "workers_launched",
    "scan_direction",
    "condition",
]
_CONDITIONS = ["Index Cond", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter", "Filter", "One-Time Filter"]
_DISABLE_COST = 1.0e10  # PostgreSQL < 18 adds this to the cost of a disabled path


def misestimate_factor(actual: float | None, planned: float | None) -> float | None:
    """Signed factor: +N when the planner under-estimated N times, -N when it over-estimated, 1 exact."""
    if actual is None or planned is None or pd.isna(actual) or pd.isna(planned):
        return None
    a, p = max(float(actual), 1.0), max(float(planned), 1.0)
    return a / p if a >= p else -(p / a)


# ----------------------------------------------------------------------------- the plan object
@dataclass
class Plan:
    """One EXPLAIN result: ``.nodes`` (DataFrame), ``.text``, ``.planning_ms``, ``.execution_ms``, ``.figure()``."""

    sql: str
    params: dict
    raw: dict
    nodes: pd.DataFrame
    triggers: pd.DataFrame
    planning_ms: float | None
    execution_ms: float | None
    analyzed: bool
    settings: dict = field(default_factory=dict)
    runs_ms: list[float] = field(default_factory=list)

    # ---- reading
    @property
    def text(self) -> str:
        """The plan as indented text, in the layout of EXPLAIN's text format."""
        return render_text(self)

    @property
    def node_types(self) -> list[str]:
        return list(self.nodes["node_type"])

    @property
    def root(self) -> pd.Series:
        return self.nodes.iloc[0]

    @property
    def median_ms(self) -> float | None:
        """Median execution time of the extra timed runs (``repeat``), else the one execution time."""
        if self.runs_ms:
            import statistics

            return statistics.median(self.runs_ms)
        return self.execution_ms

    @property
    def total_ms(self) -> float | None:
        """Median execution time (ANALYZE) or the root's total cost (plain EXPLAIN, in cost units)."""
        return self.median_ms if self.analyzed else float(self.root["total_cost"])

    @property
    def shared_blocks(self) -> int:
        """Shared buffers touched (hit + read) by the whole plan."""
        r = _records(self.nodes.head(1))[0]
        return int((r["shared_hit"] or 0) + (r["shared_read"] or 0))

    def has(self, node_type: str, relation: str | None = None) -> bool:
        """True when some node has this type (and, optionally, scans this relation)."""
        return not self.find(node_type, relation).empty

    def find(self, node_type: str | None = None, relation: str | None = None, index: str | None = None) -> pd.DataFrame:
        """Nodes of a type / on a relation / using an index."""
        df = self.nodes
        if node_type is not None:
            df = df[df["node_type"] == node_type]
        if relation is not None:
            df = df[df["relation"] == relation]
        if index is not None:
            df = df[df["index"] == index]
        return df

    @property
    def scans(self) -> pd.DataFrame:
        """The nodes that read a relation: (node_type, relation, index)."""
        df = self.nodes[self.nodes["relation"].notna()]
        return df[
            ["id", "node_type", "relation", "index", "actual_rows_total", "plan_rows", "heap_fetches", "index_searches"]
        ]

    def hottest(self, n: int = 3) -> pd.DataFrame:
        """The n nodes with the most exclusive time."""
        cols = ["id", "node_type", "relation", "index", "exclusive_ms", "exclusive_pct"]
        return self.nodes.sort_values("exclusive_ms", ascending=False).head(n)[cols]

    def misestimates(self, factor: float = 10) -> pd.DataFrame:
        """Nodes whose row estimate is off by at least ``factor`` (either way)."""
        df = self.nodes[self.nodes["misestimate"].abs() >= factor]
        return df[["id", "node_type", "relation", "plan_rows", "actual_rows", "loops", "misestimate", "estimate"]]

    def summary(self) -> dict:
        """Execution and planning time, node count, root node and the plan's shared buffers."""
        r = _records(self.nodes.head(1))[0]
        return {
            "execution_ms": self.execution_ms,
            "planning_ms": self.planning_ms,
            "nodes": len(self.nodes),
            "root": r["node_type"],
            "shared_hit": int(r["shared_hit"] or 0),
            "shared_read": int(r["shared_read"] or 0),
        }

    def __repr__(self) -> str:
        t = f"{self.execution_ms:.2f} ms" if self.execution_ms is not None else f"cost {self.root['total_cost']:.0f}"
        return f"Plan({' > '.join(self.node_types[:4])}{' ...' if len(self.nodes) > 4 else ''}; {t})"

    # ---- showing
    def _repr_html_(self) -> str:
        return plan_html(self)

    def figure(self, title: str | None = None):
        """A static picture of the plan (matplotlib Figure): tree, exclusive-time bars, misestimate flags."""
        return plan_figure(self, title=title)


# ----------------------------------------------------------------------------- running EXPLAIN
def _compile(statement, params: dict | None, dialect) -> tuple[str, dict, str]:
    """(driver SQL, driver params, readable SQL) for a select()/update()/text() or a SQL string."""
    if isinstance(statement, str):
        statement = text(statement)
    if not isinstance(statement, ClauseElement):
        raise TypeError(f"explain() takes a SQLAlchemy statement or a SQL string, not {type(statement).__name__}")
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    bound = dict(compiled.params)
    if params:
        bound.update(params)
    # the driver sees the positional/pyformat form; processors (e.g. JSON) applied like execute() would
    processors = getattr(compiled, "_bind_processors", {}) or {}
    driver_params = {k: (processors[k](v) if k in processors else v) for k, v in bound.items()}
    try:
        shown = statement.params(**params) if params else statement  # the values in, for reading
        readable = str(
            shown.compile(dialect=dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True})
        )
        if dialect.paramstyle in ("pyformat", "format"):
            readable = readable.replace("%%", "%")  # no placeholders left: every %% is an escaped %
    except Exception:  # noqa: BLE001 - untyped text() parameters: put the values in ourselves
        readable = _inline(str(compiled), bound) if dialect.paramstyle == "pyformat" else str(compiled)
    return str(compiled), driver_params, readable


def _literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if hasattr(value, "isoformat"):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


def _inline(sql: str, values: dict) -> str:
    """Readable SQL: pyformat placeholders replaced by literals, escaped %% back to %."""
    out = re.sub(
        r"%\((\w+)\)s", lambda m: _literal(values.get(m.group(1))) if m.group(1) in values else m.group(0), sql
    )
    return out.replace("%%", "%")


def _options(analyze: bool, buffers: bool, timing: bool, settings_opt: bool) -> str:
    opts = []
    if analyze:
        opts.append("ANALYZE")
        if not timing:
            opts.append("TIMING OFF")
    if buffers:
        opts.append("BUFFERS")
    if settings_opt:
        opts.append("SETTINGS")
    opts.append("FORMAT JSON")
    return ", ".join(opts)


def explain(
    statement_or_sql,
    params: dict | None = None,
    analyze: bool = True,
    buffers: bool = True,
    *,
    engine: Engine | Connection | None = None,
    settings: dict | None = None,
    timing: bool = True,
    repeat: int = 1,
    statement_timeout: str = "60s",
) -> Plan:
    """EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) a statement in a rolled-back transaction; returns a Plan.

    ``settings`` are planner settings for this statement only (``{"enable_seqscan": "off"}``), set
    transaction-local with ``set_config``. ``engine`` may be a Connection (the EXPLAIN then runs in a
    savepoint rolled back afterwards, so it sees the connection's uncommitted work). ``repeat`` > 1
    keeps ``repeat`` execution times measured with ``TIMING OFF`` (no per-node clock overhead) in
    ``.runs_ms`` (the first run counts when ``timing=False``); ``.median_ms`` is what ``compare``
    uses for the speed-up.
    """
    if engine is None:
        from .database import get_engine

        engine = get_engine()
    dialect = engine.dialect
    sql, driver_params, readable = _compile(statement_or_sql, params, dialect)
    gucs = {"statement_timeout": statement_timeout, **{k: str(v) for k, v in (settings or {}).items()}}

    def run(conn: Connection, prefix: str):
        for k, v in gucs.items():
            conn.execute(text("SELECT set_config(:k, :v, true)"), {"k": k, "v": v})
        # always a dict: psycopg then reads %% (the escaped %) as %, with or without parameters
        doc = conn.exec_driver_sql(prefix + sql, driver_params).scalar()
        if isinstance(doc, str):  # some drivers return the JSON as text
            import json

            doc = json.loads(doc)
        return doc

    def rolled_back(prefix: str):
        if isinstance(engine, Connection):
            nested = engine.begin_nested()
            try:
                return run(engine, prefix)
            finally:
                nested.rollback()
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                return run(conn, prefix)
            finally:
                trans.rollback()

    doc = rolled_back(f"EXPLAIN ({_options(analyze, buffers, timing, False)}) ")
    plan = from_json(doc, sql=readable, params=params or {}, settings=settings or {})
    if analyze and repeat > 1:
        quick = f"EXPLAIN ({_options(True, False, False, False)}) "
        # a first run with TIMING OFF is already a clean measurement; with per-node timing it is not
        first = [plan.execution_ms] if not timing else []
        plan.runs_ms = first + [rolled_back(quick)[0]["Execution Time"] for _ in range(repeat - len(first))]
    return plan


def from_json(doc, sql: str = "", params: dict | None = None, settings: dict | None = None) -> Plan:
    """A Plan from EXPLAIN's JSON (the list PostgreSQL returns, or its single element)."""
    top = doc[0] if isinstance(doc, list) else doc
    analyzed = "Execution Time" in top or "Actual Rows" in top["Plan"] or "Actual Loops" in top["Plan"]
    nodes = _node_table(top["Plan"])
    trig = pd.DataFrame(
        [
            {
                "trigger": t.get("Trigger Name"),
                "relation": t.get("Relation"),
                "calls": t.get("Calls"),
                "time_ms": t.get("Time"),
            }
            for t in top.get("Triggers", [])
        ],
        columns=["trigger", "relation", "calls", "time_ms"],
    )
    execution = top.get("Execution Time")
    if analyzed and len(nodes):
        base = execution if execution else nodes["exclusive_ms"].sum()
        nodes["exclusive_pct"] = 100.0 * nodes["exclusive_ms"] / base if base else 0.0
    return Plan(
        sql=sql,
        params=params or {},
        raw=top,
        nodes=nodes,
        triggers=trig,
        planning_ms=top.get("Planning Time"),
        execution_ms=execution,
        analyzed=analyzed,
        settings=settings or {},
    )


# ----------------------------------------------------------------------------- the node table
def _flatten(root: dict) -> list[dict]:
    """Pre-order list of nodes with id, parent, depth and the parallel divisor of their section."""
    out: list[dict] = []

    def walk(node: dict, parent: int | None, depth: int, divisor: float) -> None:
        nid = len(out)
        out.append({"node": node, "id": nid, "parent": parent, "depth": depth, "divisor": divisor})
        children = node.get("Plans", [])
        child_div = divisor
        if node.get("Node Type") in ("Gather", "Gather Merge") and children:
            # processes that ran the parallel section: the loops of the Gather's direct child
            child_div = max(float(children[0].get("Actual Loops") or 1), 1.0)
        for ch in children:
            walk(ch, nid, depth + 1, child_div)

    walk(root, None, 0, 1.0)
    return out


def _initplan_params(name: str) -> list[str]:
    """Names a node uses to refer to an InitPlan's value: "(InitPlan 2)" (PG 16+) or "$1" (PG <= 15)."""
    refs = []
    m = re.match(r"InitPlan (\d+)", name or "")
    if m:
        refs.append(f"(InitPlan {m.group(1)})")
    ret = re.search(r"returns (.*)\)", name or "")
    if ret:
        refs += [p.strip() for p in ret.group(1).split(",")]
    return refs


def _node_text(node: dict) -> str:
    parts = [str(node.get(k, "")) for k in _CONDITIONS + ["Output", "Sort Key", "Group Key", "Index Name"]]
    return " ".join(parts)


def _subtree(items: list[dict], nid: int) -> set[int]:
    ids, stack = set(), [nid]
    while stack:
        i = stack.pop()
        ids.add(i)
        stack.extend(it["id"] for it in items if it["parent"] == i)
    return ids


def _node_table(root: dict) -> pd.DataFrame:
    items = _flatten(root)
    rows = []
    for it in items:
        n = it["node"]
        loops = n.get("Actual Loops")
        per_loop_ms = n.get("Actual Total Time")
        inclusive = None
        if per_loop_ms is not None and loops is not None:
            inclusive = float(per_loop_ms) * float(loops) / it["divisor"]
        actual = n.get("Actual Rows")
        rows_total = float(actual) * float(loops) if actual is not None and loops is not None else None
        mis = misestimate_factor(actual, n.get("Plan Rows")) if loops else None
        removed = n.get("Rows Removed by Filter", n.get("Rows Removed by Join Filter"))
        recheck = n.get("Rows Removed by Index Recheck")
        disabled = n.get("Disabled")
        if disabled is None:
            disabled = float(n.get("Startup Cost", 0) or 0) >= _DISABLE_COST
        cond = "; ".join(f"{k}: {n[k]}" for k in _CONDITIONS if k in n)
        rows.append(
            {
                "id": it["id"],
                "parent": it["parent"],
                "depth": it["depth"],
                "node_type": n.get("Node Type"),
                "relation": n.get("Relation Name") or (f"CTE {n['CTE Name']}" if "CTE Name" in n else None),
                "alias": n.get("Alias"),
                "index": n.get("Index Name"),
                "join_type": n.get("Join Type"),
                "strategy": n.get("Strategy"),
                "relationship": n.get("Parent Relationship"),
                "subplan": n.get("Subplan Name"),
                "parallel": bool(n.get("Parallel Aware")) or it["divisor"] > 1,
                "plan_rows": n.get("Plan Rows"),
                "actual_rows": actual,
                "actual_rows_total": rows_total,
                "loops": loops,
                "misestimate": mis,
                "estimate": None if mis is None else ("under" if mis > 1 else "over" if mis < -1 else "exact"),
                "startup_cost": n.get("Startup Cost"),
                "total_cost": n.get("Total Cost"),
                "disabled": bool(disabled),
                "inclusive_ms": inclusive,
                "exclusive_ms": inclusive,
                "shared_hit": n.get("Shared Hit Blocks"),
                "shared_read": n.get("Shared Read Blocks"),
                "shared_dirtied": n.get("Shared Dirtied Blocks"),
                "temp_read": n.get("Temp Read Blocks"),
                "temp_written": n.get("Temp Written Blocks"),
                "rows_removed_by_filter": None if removed is None or loops is None else float(removed) * float(loops),
                "rows_removed_by_recheck": None if recheck is None or loops is None else float(recheck) * float(loops),
                "heap_fetches": n.get("Heap Fetches"),
                "index_searches": n.get("Index Searches"),
                "workers_launched": n.get("Workers Launched"),
                "scan_direction": n.get("Scan Direction"),
                "condition": cond or None,
            }
        )
    if rows and rows[0]["inclusive_ms"] is not None:
        _exclusive(items, rows)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["parent"] = df["parent"].astype("Int64")
    return df


def _exclusive(items: list[dict], rows: list[dict]) -> None:
    """Subtract from each node the time of the children it really paid for; never below zero."""
    incl = [r["inclusive_ms"] or 0.0 for r in rows]
    excl = list(incl)
    for it in items:
        i, parent = it["id"], it["parent"]
        if parent is None:
            continue
        node = it["node"]
        payer = parent
        if node.get("Parent Relationship") == "InitPlan":
            name = node.get("Subplan Name") or ""
            own = _subtree(items, i)
            if name.startswith("CTE "):
                cte = name[4:]
                cands = [x["id"] for x in items if x["node"].get("CTE Name") == cte and x["id"] not in own]
            else:
                refs = _initplan_params(name)
                cands = [
                    x["id"]
                    for x in items
                    if x["id"] not in own
                    and x["id"] != parent
                    and any(re.search(re.escape(r) + r"(?!\d)", _node_text(x["node"])) for r in refs)
                ]
            if cands:
                # the first reader pulled the subplan: charge the one that took the most time
                payer = max(cands, key=lambda c: excl[c])
        excl[payer] -= incl[i]
    for r, e in zip(rows, excl, strict=True):
        r["exclusive_ms"] = max(e, 0.0)
