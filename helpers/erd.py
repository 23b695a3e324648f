"""An entity-relationship picture drawn from SQLAlchemy metadata with matplotlib (no Graphviz needed).

Tables are placed in columns by their depth in the foreign-key graph (parents left, children
right); each box lists the columns with PK / FK / IX markers; an arrow runs from every foreign
key to the table it references. A foreign key without an index is drawn dashed in red.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch
from sqlalchemy import MetaData, Table

LINE_H = 0.32
BOX_W = 3.3
GAP_X = 1.6
GAP_Y = 0.55


def _depths(tables: list[Table]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for t in tables:  # sorted_tables: parents before children
        parents = [fk.column.table.name for fk in t.foreign_keys if fk.column.table.name != t.name]
        depth[t.name] = 1 + max((depth.get(p, 0) for p in parents), default=-1)
    return depth


def _indexed_columns(table: Table) -> set[str]:
    first = set()
    for ix in table.indexes:
        first.add(list(ix.columns)[0].name)
    for c in table.constraints:
        cols = list(getattr(c, "columns", []))
        if cols and c.__class__.__name__ in ("PrimaryKeyConstraint", "UniqueConstraint"):
            first.add(cols[0].name)
    return first


def _type_name(col) -> str:
    from sqlalchemy.dialects import postgresql

    try:
        name = col.type.compile(dialect=postgresql.dialect())
    except Exception:  # noqa: BLE001 - dialect-specific types
        name = type(col.type).__name__
    return name.lower().replace("timestamp with time zone", "timestamptz").replace("character varying", "varchar")


def er_diagram(metadata: MetaData, *, title: str = "Workbook schema"):
    """Draw the schema; returns the Figure."""
    tables = metadata.sorted_tables
    depth = _depths(tables)
    columns: dict[int, list[Table]] = {}
    for t in tables:
        columns.setdefault(depth[t.name], []).append(t)
    pos: dict[str, tuple[float, float, float]] = {}  # name -> (x, y_top, height)
    max_h = 0.0
    for d, ts in columns.items():
        y = 0.0
        for t in sorted(ts, key=lambda t: t.name):
            h = LINE_H * (len(t.columns) + 1.3)
            pos[t.name] = (d * (BOX_W + GAP_X), -y, h)
            y += h + GAP_Y
        max_h = max(max_h, y)
    width = (max(columns) + 1) * (BOX_W + GAP_X)
    fig, ax = plt.subplots(figsize=(width * 0.95, max_h * 0.95 + 0.8))
    ax.set_title(title)
    ax.axis("off")
    row_y: dict[tuple[str, str], float] = {}
    for t in tables:
        x, top, h = pos[t.name]
        ax.add_patch(
            FancyBboxPatch(
                (x, top - h), BOX_W, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc="#f7f9fc", ec="#34495e", lw=1.2
            )
        )
        ax.add_patch(
            FancyBboxPatch(
                (x, top - LINE_H * 1.1),
                BOX_W,
                LINE_H * 1.1,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                fc="#34495e",
                ec="#34495e",
            )
        )
        ax.text(x + 0.12, top - LINE_H * 0.58, t.name, color="white", weight="bold", va="center", fontsize=10)
        indexed = _indexed_columns(t)
        fk_cols = {fk.parent.name for fk in t.foreign_keys}
        for i, col in enumerate(t.columns):
            y = top - LINE_H * (1.6 + i)
            marks = []
            if col.primary_key:
                marks.append("PK")
            if col.name in fk_cols:
                marks.append("FK")
            unindexed_fk = col.name in fk_cols and col.name not in indexed and not col.primary_key
            color = "#c0392b" if unindexed_fk else "#2c3e50"
            ax.text(x + 0.12, y, "/".join(marks), fontsize=7, color="#7f8c8d", va="center", family="monospace")
            ax.text(
                x + 0.62,
                y,
                col.name + (" (no index!)" if unindexed_fk else ""),
                fontsize=8.5,
                va="center",
                color=color,
                weight="bold" if col.primary_key else "normal",
            )
            ax.text(x + BOX_W - 0.1, y, _type_name(col), fontsize=7, va="center", ha="right", color="#7f8c8d")
            row_y[(t.name, col.name)] = y
    for t in tables:
        indexed = _indexed_columns(t)
        for fk in t.foreign_keys:
            parent = fk.column.table.name
            x0, _, _ = pos[t.name]
            x1, top1, _ = pos[parent]
            y0 = row_y[(t.name, fk.parent.name)]
            y1 = top1 - LINE_H * 0.55
            unindexed = fk.parent.name not in indexed and not fk.parent.primary_key
            start = (x0, y0) if x1 < x0 else (x0 + BOX_W, y0)
            end = (x1 + BOX_W, y1) if x1 < x0 else (x1, y1)
            ax.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops=dict(
                    arrowstyle="-|>",
                    color="#c0392b" if unindexed else "#5d6d7e",
                    lw=1.1,
                    linestyle="--" if unindexed else "-",
                    connectionstyle="arc3,rad=0.08",
                    shrinkA=2,
                    shrinkB=2,
                ),
            )
    ax.set_xlim(-0.2, width - GAP_X + 0.2)
    ax.set_ylim(-max_h - 0.2, 0.3)
    fig.tight_layout()
    return fig
