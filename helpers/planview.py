"""How a plan is shown: the rich Jupyter display (an indented tree with exclusive-time bars) and the
matplotlib picture (tree left, bars right), for one plan or a before/after pair.

Split from ``plans`` (which runs EXPLAIN and builds the node table); these functions read only a
plan's ``nodes``, ``execution_ms``, ``planning_ms``, ``analyzed``, ``settings`` and ``sql``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import pandas as pd

HOT = [(0.5, "#d62728"), (0.2, "#ff7f0e"), (0.05, "#f2c94c"), (0.0, "#9fb7cc")]


def _color(share: float) -> str:
    return next(c for limit, c in HOT if share >= limit)


# ----------------------------------------------------------------------------- node labels
def _records(df: pd.DataFrame) -> list[dict]:
    """Rows as dicts with None for missing values (pandas turns None into NaN)."""
    return [
        {k: (None if v is pd.NA or (isinstance(v, float) and v != v) else v) for k, v in row.items()}
        for row in df.to_dict(orient="records")
    ]


def _label(r: dict) -> str:
    s = str(r["node_type"])
    jt = r["join_type"]
    if jt and jt != "Inner":
        if s == "Nested Loop":
            s = f"Nested Loop {jt} Join"
        elif s.endswith("Join"):
            s = s[: -len("Join")] + f"{jt} Join"
    if r["strategy"] and r["node_type"] == "Aggregate" and r["strategy"] != "Plain":
        s = {"Hashed": "HashAggregate", "Sorted": "GroupAggregate", "Mixed": "MixedAggregate"}.get(r["strategy"], s)
    if r.get("scan_direction") == "Backward":
        s += " Backward"
    if r["index"] and r["node_type"] != "Bitmap Index Scan":
        s += f" using {r['index']}"
    if r["relation"]:
        s += f" on {r['relation']}"
        if r["alias"] and r["alias"] != r["relation"] and not str(r["relation"]).startswith("CTE"):
            s += f" {r['alias']}"
    elif r["index"]:
        s += f" on {r['index']}"
    return s


def _fmt_rows(v) -> str:
    if v is None or pd.isna(v):
        return "-"
    v = float(v)
    return f"{v:.0f}" if v.is_integer() else f"{v:.2f}"


def _fmt_int(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{float(v):,.0f}"


def _flag(mis) -> str:
    if mis is None or pd.isna(mis):
        return ""
    a = abs(mis)
    word = "under" if mis > 0 else "over"
    if a >= 100:
        return f"‼ ×{a:,.0f} {word}"
    if a >= 10:
        return f"⚠ ×{a:,.0f} {word}"
    return ""


# ----------------------------------------------------------------------------- rich display
def plan_html(plan, max_sql: int = 400) -> str:
    """An indented tree with a bar per node for its share of exclusive time, hot nodes coloured."""
    nodes = plan.nodes
    total = plan.execution_ms or (nodes["exclusive_ms"].sum() if plan.analyzed else None)
    head = (
        f"<b>Execution</b> {plan.execution_ms:,.2f} ms · <b>planning</b> {plan.planning_ms:,.2f} ms"
        if plan.execution_ms is not None
        else f"<b>estimated cost</b> {plan.root['total_cost']:,.2f} (not executed)"
    )
    head += f" · <b>buffers</b> hit {_fmt_int(plan.root['shared_hit'])} read {_fmt_int(plan.root['shared_read'])}"
    if plan.settings:
        head += " · <b>settings</b> " + html.escape(", ".join(f"{k}={v}" for k, v in plan.settings.items()))
    rows_html = []
    for r in _records(nodes):
        share = (r["exclusive_ms"] / total) if plan.analyzed and total else 0.0
        color = _color(share)
        label = html.escape(_label(r))
        sub = f"<span style='color:#888'>{html.escape(str(r['subplan']))} · </span>" if r["subplan"] else ""
        cond = (
            f"<div style='color:#777;font-size:85%'>{html.escape(str(r['condition'])[:160])}</div>"
            if r["condition"]
            else ""
        )
        flag = _flag(r["misestimate"])
        flag_html = (
            (
                f" <span style='color:{'#d62728' if abs(r['misestimate']) >= 100 else '#e67e00'};font-weight:bold'>"
                f"{html.escape(flag)}</span>"
            )
            if flag
            else ""
        )
        bar = (
            f"<div style='background:#eee;width:140px;height:10px;display:inline-block'>"
            f"<div style='background:{color};width:{min(share, 1) * 100:.1f}%;height:10px'></div></div>"
        )
        time_cell = (
            f"{bar} {r['exclusive_ms']:,.2f} ms <span style='color:#888'>({share:.0%})</span>" if plan.analyzed else ""
        )
        rows_cell = (
            f"{_fmt_rows(r['actual_rows'])} <span style='color:#888'>/ est {_fmt_int(r['plan_rows'])}</span>{flag_html}"
            + (f" <span style='color:#888'>× {int(r['loops'])} loops</span>" if r["loops"] and r["loops"] > 1 else "")
            if plan.analyzed
            else f"est {_fmt_int(r['plan_rows'])}"
        )
        bufs = f"{_fmt_int(r['shared_hit'])} / {_fmt_int(r['shared_read'])}"
        weight = "bold" if share >= 0.2 else "normal"
        rows_html.append(
            f"<tr><td style='text-align:left;padding-left:{6 + 18 * r['depth']}px'>{sub}"
            f"<span style='font-weight:{weight}'>{'↳ ' if r['depth'] else ''}{label}</span>{cond}</td>"
            f"<td style='text-align:left;white-space:nowrap'>{time_cell}</td>"
            f"<td style='text-align:left;white-space:nowrap'>{rows_cell}</td>"
            f"<td style='text-align:right'>{bufs}</td></tr>"
        )
    sql = html.escape(plan.sql if len(plan.sql) <= max_sql else plan.sql[:max_sql] + " …")
    return (
        f"<div style='font-family:monospace;font-size:12px'><div>{head}</div>"
        f"<details><summary>SQL</summary><pre>{sql}</pre></details>"
        f"<table style='border-collapse:collapse'><thead><tr><th style='text-align:left'>node</th>"
        f"<th style='text-align:left'>exclusive time</th><th style='text-align:left'>rows actual / estimated</th>"
        f"<th>buffers hit / read</th></tr></thead><tbody>{''.join(rows_html)}</tbody></table></div>"
    )


# ----------------------------------------------------------------------------- static picture
_CHAR_IN = 0.085  # width of one 9-pt monospace character, inches (bold, with a margin)


def _tree_label(r: dict) -> str:
    return (f"[{r['subplan']}] " if r["subplan"] else "") + _label(r)


def _draw(plan, ax_tree, ax_bar, width_chars: int, xmax: float | None = None) -> None:
    n = len(plan.nodes)
    total = plan.execution_ms or plan.nodes["exclusive_ms"].sum() or 1.0
    recs = _records(plan.nodes)
    ax_tree.set_xlim(0, width_chars)
    ax_tree.set_ylim(n - 0.5, -0.5)
    ax_tree.axis("off")
    for r in recs:
        y, d = int(r["id"]), int(r["depth"])
        share = (r["exclusive_ms"] / total) if plan.analyzed else 0.0
        ax_tree.text(
            2 * d + 0.3,
            y,
            _tree_label(r),
            va="center",
            ha="left",
            fontsize=9,
            family="monospace",
            fontweight="bold" if share >= 0.2 else "normal",
            color="#111" if share >= 0.05 else "#444",
        )
        if r["parent"] is not None:
            px = 2 * (d - 1) + 0.9
            ax_tree.plot([px, px, 2 * d + 0.1], [int(r["parent"]) + 0.32, y, y], color="#aaa", lw=0.9)
    vals = [float(v) if plan.analyzed else 0.0 for v in plan.nodes["exclusive_ms"]]
    ax_bar.barh(range(n), vals, color=[_color(v / total) for v in vals], height=0.6)
    ax_bar.set_ylim(n - 0.5, -0.5)
    ax_bar.set_yticks([])
    ax_bar.grid(axis="y", visible=False)
    ax_bar.spines["left"].set_visible(False)
    right = xmax or max(vals + [1e-3])
    ax_bar.set_xlim(0, right * 2.1)
    for y, (v, r) in enumerate(zip(vals, recs, strict=True)):
        if plan.analyzed and r["loops"]:
            note = f"{v:,.1f} ms ({v / total:.0%})  rows {_fmt_int(r['actual_rows_total'])} / est {_fmt_int(r['plan_rows'] * r['loops'])}"
        elif plan.analyzed:
            note = "never executed"
        else:
            note = f"est rows {_fmt_int(r['plan_rows'])}"
        flag = _flag(r["misestimate"])
        color = "#333" if not flag else "#d62728" if abs(r["misestimate"]) >= 100 else "#e67e00"
        ax_bar.text(
            v + right * 0.02,
            y,
            note + (f"  {flag}" if flag else ""),
            va="center",
            fontsize=8,
            color=color,
            fontweight="bold" if flag else "normal",
        )
    ax_bar.set_xlabel("exclusive time (ms)" if plan.analyzed else "(not executed)")


def _grid_figure(plans: list, titles: list[str], suptitle: str | None, shared_x: bool):
    import matplotlib.pyplot as plt

    heights = [max(len(p.nodes), 1) + 1.2 for p in plans]
    width_chars = max(max(len(_tree_label(r)) + 2 * int(r["depth"]) + 1 for r in _records(p.nodes)) for p in plans)
    tree_w = max(2.5, _CHAR_IN * width_chars)
    bar_w = 6.5
    fig = plt.figure(figsize=(tree_w + bar_w, 0.36 * sum(heights) + 0.5 * len(plans) + (0.5 if suptitle else 0.1)))
    gs = fig.add_gridspec(
        len(plans),
        2,
        width_ratios=[tree_w, bar_w],
        height_ratios=heights,
        wspace=0.0,
        hspace=0.6,
        left=0.01,
        right=0.97,
    )
    xmax = max(max(p.nodes["exclusive_ms"].max() or 0, 1e-3) for p in plans) if shared_x else None
    for i, (p, t) in enumerate(zip(plans, titles, strict=True)):
        ax_tree, ax_bar = fig.add_subplot(gs[i, 0]), fig.add_subplot(gs[i, 1])
        _draw(p, ax_tree, ax_bar, width_chars, xmax=xmax)
        ax_tree.set_title(t, loc="left", fontsize=11, fontweight="bold")
    if suptitle:
        fig.suptitle(suptitle, fontsize=13, fontweight="bold", x=0.01, ha="left")
    if any(p.analyzed for p in plans):
        fig.text(
            0.01,
            0.0,
            "bar = the node's own (exclusive) time; colour = its share of the run: red ≥ 50 %, "
            "orange ≥ 20 %, yellow ≥ 5 %.  rows actual / estimated (× loops);  ⚠ ×10, ‼ ×100 misestimate",
            fontsize=8,
            color="#555",
            va="top",
            ha="left",
        )
    return fig


def _plan_title(plan, title: str | None) -> str:
    if plan.execution_ms is not None:
        t = f"execution {plan.execution_ms:,.1f} ms · planning {plan.planning_ms:,.1f} ms · buffers {plan.shared_blocks:,}"
    else:
        t = f"estimated cost {plan.root['total_cost']:,.0f}"
    return f"{title} — {t}" if title else t


def plan_figure(plan, title: str | None = None):
    """The plan as a matplotlib Figure: indented tree left, exclusive-time bars right (hot = red)."""
    return _grid_figure([plan], [_plan_title(plan, title)], None, shared_x=False)


# ----------------------------------------------------------------------------- before / after
@dataclass
class Comparison:
    """Two plans of the same question: ``.speedup`` (execution time ratio), ``.df``, display, ``.figure()``."""

    before: Any
    after: Any
    labels: tuple[str, str] = ("before", "after")

    @property
    def speedup(self) -> float:
        return self.before.total_ms / self.after.total_ms if self.after.total_ms else float("inf")

    @property
    def df(self) -> pd.DataFrame:
        rows = []
        for label, p in zip(self.labels, (self.before, self.after), strict=True):
            rows.append(
                {
                    "plan": label,
                    "execution_ms": p.execution_ms,
                    "planning_ms": p.planning_ms,
                    "shared_blocks": p.shared_blocks,
                    "root": p.root["node_type"],
                    "scans": ", ".join(
                        f"{r.node_type} on {r.relation}" + (f" ({r.index})" if r.index else "")
                        for r in p.scans.itertuples()
                    ),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"Comparison(speedup=×{self.speedup:.1f}, {self.before!r} -> {self.after!r})"

    def _repr_html_(self) -> str:
        head = (
            f"<h4 style='margin:4px 0'>speed-up ×{self.speedup:,.1f} "
            f"({self.before.total_ms:,.2f} → {self.after.total_ms:,.2f} ms), buffers "
            f"{self.before.shared_blocks:,} → {self.after.shared_blocks:,}</h4>"
        )
        cols = "".join(
            f"<div style='flex:1;min-width:420px'><b>{html.escape(lbl)}</b>{plan_html(p)}</div>"
            for lbl, p in zip(self.labels, (self.before, self.after), strict=True)
        )
        return head + f"<div style='display:flex;gap:16px;flex-wrap:wrap'>{cols}</div>"

    def figure(self, title: str | None = None):
        """Both plans stacked on one time axis, so the 'after' bars are to scale with the 'before' ones."""
        sup = f"{title + ': ' if title else ''}speed-up ×{self.speedup:,.1f}"
        return _grid_figure(
            [self.before, self.after],
            [_plan_title(self.before, self.labels[0]), _plan_title(self.after, self.labels[1])],
            sup,
            shared_x=True,
        )


def compare(before, after, labels: tuple[str, str] = ("before", "after")) -> Comparison:
    """Two plans side by side with the speed-up (before execution time / after execution time)."""
    return Comparison(before, after, labels)
