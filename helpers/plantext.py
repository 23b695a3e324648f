"""A plan's text in the layout of PostgreSQL's own ``EXPLAIN (FORMAT TEXT)``, rebuilt from the JSON of
the same single execution (a second ``EXPLAIN ANALYZE`` would show other times and buffers).

It follows ``src/backend/commands/explain.c`` for what the workbook's chapters show: node labels
(join types, aggregate strategies, scan direction, index and alias), costs and width, actual time /
rows / loops (PostgreSQL 18 prints rows with two decimals, 17 and older as integers: the JSON's
number type tells which), ``(never executed)``, the conditions, rows removed by filter and recheck,
Heap Fetches, Index Searches (PostgreSQL 18), Heap Blocks, Sort Key / Sort Method, Group Key,
HashAggregate batches, Hash buckets, Memoize counts, workers, Buffers, the Planning buffers, triggers
and the times. ``tests/test_plans.py`` compares it line by line with the server's own text.
"""

from __future__ import annotations

_SCANS_WITH_TARGET = {
    "Seq Scan",
    "Sample Scan",
    "Index Scan",
    "Index Only Scan",
    "Bitmap Heap Scan",
    "Tid Scan",
    "Tid Range Scan",
    "Subquery Scan",
    "Function Scan",
    "Table Function Scan",
    "Values Scan",
    "CTE Scan",
    "Named Tuplestore Scan",
    "WorkTable Scan",
    "Foreign Scan",
    "ModifyTable",
}
_JOINS = {"Nested Loop": "Nested Loop", "Merge Join": "Merge", "Hash Join": "Hash"}


def _quote(name: str) -> str:
    """quote_identifier: bare when lower-case letters, digits and underscores (not leading digit)."""
    ok = name and (name[0].islower() or name[0] == "_") and all(c.islower() or c.isdigit() or c == "_" for c in name)
    return name if ok else '"' + name.replace('"', '""') + '"'


def _target(node: dict) -> str:
    obj = (
        node.get("Relation Name")
        or node.get("CTE Name")
        or node.get("Function Name")
        or node.get("Tuplestore Name")
        or node.get("Table Function Name")
    )
    if node.get("Node Type") == "Values Scan":
        obj = "*VALUES*"
    alias = node.get("Alias")
    out = " on"
    if obj is not None:
        out += " " + _quote(obj)
    if alias is not None and (obj is None or alias != obj):
        out += " " + _quote(alias)
    return out if (obj or alias) else ""


def label(node: dict) -> str:
    """The node's name as the text format prints it: ``Hash Left Join``, ``Index Scan Backward using ix on t a``."""
    t = node.get("Node Type", "")
    prefix = ("Parallel " if node.get("Parallel Aware") else "") + ("Async " if node.get("Async Capable") else "")
    if t == "Aggregate":
        s = {"Hashed": "HashAggregate", "Sorted": "GroupAggregate", "Mixed": "MixedAggregate"}.get(
            node.get("Strategy"), "Aggregate"
        )
        if node.get("Partial Mode") in ("Partial", "Finalize"):
            s = f"{node['Partial Mode']} {s}"
    elif t == "SetOp":
        s = ("HashSetOp" if node.get("Strategy") == "Hashed" else "SetOp") + " " + node.get("Command", "")
    elif t == "ModifyTable":
        s = node.get("Operation", t)
    elif t in _JOINS:
        s = _JOINS[t]
        jt = node.get("Join Type", "Inner")
        if jt != "Inner":
            s += f" {jt} Join"
        elif t != "Nested Loop":
            s += " Join"
    else:
        s = t
    s = prefix + s
    if t in ("Index Scan", "Index Only Scan"):
        if node.get("Scan Direction") == "Backward":
            s += " Backward"
        s += " using " + _quote(node["Index Name"])
    elif t == "Bitmap Index Scan":
        s += " on " + _quote(node["Index Name"])
    if t in _SCANS_WITH_TARGET:
        s += _target(node)
    return s


def _num_rows(v, pg18: bool) -> str:
    return f"{float(v):.2f}" if pg18 else f"{float(v):.0f}"


def _buffers(node: dict, prefix: str = "") -> list[str]:
    groups = []
    for kind, keys in (
        ("shared", ("hit", "read", "dirtied", "written")),
        ("local", ("hit", "read", "dirtied", "written")),
        ("temp", ("read", "written")),
    ):
        parts = [f"{k}={int(node.get(f'{kind.title()} {k.title()} Blocks', 0) or 0)}" for k in keys]
        parts = [p for p in parts if not p.endswith("=0")]
        if parts:
            groups.append(" " + kind + " " + " ".join(parts))
    return [prefix + "Buffers:" + ",".join(groups)] if groups else []


def _details(node: dict, analyzed: bool, pg18: bool) -> list[str]:
    """The lines under a node's header, in explain.c's order."""
    t = node.get("Node Type")
    out: list[str] = []
    executed = analyzed and (node.get("Actual Loops") or 0) > 0

    def cond(key):
        if key in node:
            out.append(f"{key}: {node[key]}")

    def removed(key):
        if executed and (node.get(key) or 0) > 0:
            out.append(f"{key}: {float(node[key]):.0f}")

    def keys(key):
        if node.get(key):
            out.append(f"{key}: " + ", ".join(node[key]))

    if t in ("Index Scan", "Index Only Scan"):
        cond("Index Cond")
        removed("Rows Removed by Index Recheck")
        cond("Order By")
        cond("Filter")
        removed("Rows Removed by Filter")
        if t == "Index Only Scan" and analyzed and "Heap Fetches" in node:
            out.append(f"Heap Fetches: {float(node['Heap Fetches']):.0f}")
        if analyzed and "Index Searches" in node:
            out.append(f"Index Searches: {int(node['Index Searches'])}")
    elif t == "Bitmap Index Scan":
        cond("Index Cond")
        if analyzed and "Index Searches" in node:
            out.append(f"Index Searches: {int(node['Index Searches'])}")
    elif t == "Bitmap Heap Scan":
        cond("Recheck Cond")
        removed("Rows Removed by Index Recheck")
        cond("Filter")
        removed("Rows Removed by Filter")
        if executed:
            blocks = [(k, node.get(f"{k.title()} Heap Blocks", 0) or 0) for k in ("exact", "lossy")]
            if any(v for _, v in blocks):
                out.append("Heap Blocks:" + "".join(f" {k}={int(v)}" for k, v in blocks if v))
    elif t in _JOINS:
        cond({"Nested Loop": "Join Filter", "Merge Join": "Merge Cond", "Hash Join": "Hash Cond"}[t])
        if t != "Nested Loop":
            cond("Join Filter")
        removed("Rows Removed by Join Filter")
        cond("Filter")
        removed("Rows Removed by Filter")
    elif t in ("Aggregate", "Group"):
        keys("Group Key")
        cond("Filter")
        removed("Rows Removed by Filter")
        if t == "Aggregate" and node.get("Strategy") in ("Hashed", "Mixed"):
            line = f"Planned Partitions: {node['Planned Partitions']}" if node.get("Planned Partitions") else ""
            if analyzed and "HashAgg Batches" in node:
                line += ("  " if line else "") + (
                    f"Batches: {node['HashAgg Batches']}  Memory Usage: {node.get('Peak Memory Usage', 0)}kB"
                )
                if (node.get("HashAgg Batches") or 0) > 1:
                    line += f"  Disk Usage: {node.get('Disk Usage', 0)}kB"
            if line:
                out.append(line)
    elif t in ("Sort", "Incremental Sort"):
        keys("Sort Key")
        keys("Presorted Key")
        for group in ("Full-sort", "Pre-sorted") if executed else ():
            info = node.get(f"{group} Groups")
            if info and info.get("Group Count"):
                methods = info.get("Sort Methods Used", [])
                line = f"{group} Groups: {info['Group Count']}  Sort Method{'s' if len(methods) > 1 else ''}: "
                line += ", ".join(methods)
                for space, word in (("Memory", "Memory"), ("Disk", "Disk")):
                    used = info.get(f"Sort Space {space}")
                    if used and (space == "Memory" or used.get("Peak Sort Space Used")):
                        line += (
                            f"  Average {word}: {used['Average Sort Space Used']}kB"
                            f"  Peak {word}: {used['Peak Sort Space Used']}kB"
                        )
                out.append(line)
        if executed and "Sort Method" in node:
            out.append(
                f"Sort Method: {node['Sort Method']}  {node.get('Sort Space Type', 'Memory')}: "
                f"{node.get('Sort Space Used', 0)}kB"
            )
    elif t == "Hash":
        if analyzed and node.get("Hash Batches"):
            b, ob = node["Hash Buckets"], node.get("Original Hash Buckets", node["Hash Buckets"])
            n, on = node["Hash Batches"], node.get("Original Hash Batches", node["Hash Batches"])
            mem = node.get("Peak Memory Usage", 0)
            if (b, n) != (ob, on):
                out.append(f"Buckets: {b} (originally {ob})  Batches: {n} (originally {on})  Memory Usage: {mem}kB")
            else:
                out.append(f"Buckets: {b}  Batches: {n}  Memory Usage: {mem}kB")
    elif t == "Memoize":
        cond("Cache Key")
        cond("Cache Mode")
        if executed and "Cache Hits" in node:
            out.append(
                f"Hits: {node['Cache Hits']}  Misses: {node['Cache Misses']}  Evictions: {node['Cache Evictions']}  "
                f"Overflows: {node['Cache Overflows']}  Memory Usage: {node.get('Peak Memory Usage', 0)}kB"
            )
    elif t in ("Gather", "Gather Merge"):
        if "Workers Planned" in node:
            out.append(f"Workers Planned: {node['Workers Planned']}")
        if analyzed and "Workers Launched" in node:
            out.append(f"Workers Launched: {node['Workers Launched']}")
    elif t == "Result":
        cond("One-Time Filter")
        cond("Filter")
        removed("Rows Removed by Filter")
    elif t != "ModifyTable":
        cond("Filter")
        removed("Rows Removed by Filter")
    if executed or not analyzed:
        out += _buffers(node)
    return out


def render_text(plan) -> str:
    """``EXPLAIN``'s text for ``plan`` (a ``helpers.plans.Plan``), from its JSON: one execution, one set of numbers."""
    top = plan.raw
    root = top["Plan"]
    pg18 = isinstance(_first(root, "Actual Rows"), float)
    lines: list[str] = []

    def node_lines(node: dict, indent: int, first: bool) -> None:
        name = node.get("Subplan Name")
        if name and not first:
            lines.append("  " * indent + name)
            indent += 1
        head = ""
        if not first:
            head = "  " * indent + "->  "
            indent += 2
        head += label(node)
        if "Startup Cost" in node:
            head += (
                f"  (cost={node['Startup Cost']:.2f}..{node['Total Cost']:.2f} "
                f"rows={float(node['Plan Rows']):.0f} width={node.get('Plan Width', 0)})"
            )
        if plan.analyzed:
            loops = node.get("Actual Loops") or 0
            if not loops:
                head += " (never executed)"
            else:
                timing = (
                    f"time={node.get('Actual Startup Time', 0):.3f}..{node['Actual Total Time']:.3f} "
                    if "Actual Total Time" in node
                    else ""
                )
                head += f" (actual {timing}rows={_num_rows(node['Actual Rows'], pg18)} loops={loops:.0f})"
        lines.append(head)
        indent += 1
        lines.extend("  " * indent + d for d in _details(node, plan.analyzed, pg18))
        for child in node.get("Plans", []):
            node_lines(child, indent, False)

    node_lines(root, 0, True)
    planning = top.get("Planning")
    if isinstance(planning, dict):
        bufs = _buffers(planning, "  ")
        if bufs:
            lines += ["Planning:"] + bufs
    if plan.planning_ms is not None:
        lines.append(f"Planning Time: {plan.planning_ms:.3f} ms")
    for trig in top.get("Triggers", []):
        name = trig.get("Trigger Name", "")
        if trig.get("Constraint Name"):
            name += f" for constraint {trig['Constraint Name']}"
        if trig.get("Relation"):
            name += f" on {trig['Relation']}"
        timing = f"time={trig['Time']:.3f} " if "Time" in trig else ""
        lines.append(f"Trigger {name}: {timing}calls={float(trig.get('Calls', 0)):.0f}")
    if plan.execution_ms is not None:
        lines.append(f"Execution Time: {plan.execution_ms:.3f} ms")
    return "\n".join(lines)


def _first(node: dict, key: str):
    """The first value of ``key`` in the tree (pre-order), or None."""
    if key in node:
        return node[key]
    for child in node.get("Plans", []):
        found = _first(child, key)
        if found is not None:
            return found
    return None
