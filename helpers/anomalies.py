"""The anomaly catalogue of Adya / Berenson et al. (as tested by Hermitage), as data.

Each ``Anomaly`` is a scripted interleaving (sessions, steps, permutation) on a two-row table
``(1, 10), (2, 20)`` plus a ``decide`` function that reads the transcript — values the sessions
read, their errors, the final rows — and says whether the anomaly *occurred*. Nothing here knows
what PostgreSQL is expected to do at a given level: the verdicts are observations.

A verifier session ``V`` reads the final rows after every run (step ``final``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

LEVELS = ("read uncommitted", "read committed", "repeatable read", "serializable")
RETRYABLE = {"40001": "serialization failure", "40P01": "deadlock"}


@dataclass(frozen=True)
class Verdict:
    """Whether the anomaly occurred, and the observation that says so."""

    occurred: bool
    evidence: str


@dataclass(frozen=True)
class Anomaly:
    """One anomaly: steps per session (SQL with ``{t}`` for the table), a permutation, a decision."""

    key: str
    name: str
    sessions: dict[str, dict[str, str]]
    permutation: tuple[str, ...]
    decide: Callable[[object], Verdict]
    rows: tuple[tuple[int, int], ...] = ((1, 10), (2, 20))
    about: str = ""


@dataclass
class Run:
    """One anomaly run at one level: verdict, how it was prevented, and the transcript."""

    anomaly: Anomaly
    level: str
    verdict: Verdict
    how: str
    transcript: object = field(repr=False)

    @property
    def outcome(self) -> str:
        return "occurred" if self.verdict.occurred else "prevented"


# ---- reading a transcript -------------------------------------------------------------------------


def _pairs(tr, step) -> dict[int, int]:
    """Rows (id, value) returned by a step as a dict; {} when it failed or returned nothing."""
    return {int(r[0]): int(r[1]) for r in (tr.rows(step) or [])}


def _final(tr) -> dict[int, int]:
    return _pairs(tr, "final")


def committed(tr, session: str) -> bool:
    """True when no step of ``session`` raised an error (so its COMMIT really committed)."""
    df = tr.df
    return not df[(df["session"] == session)]["sqlstate"].notna().any()


def how(tr, occurred: bool) -> str:
    """How the anomaly was prevented, read off the transcript: blocked, serialization failure, snapshot."""
    if occurred:
        return "not prevented"
    seen: list[str] = []
    for _, row in tr.df.sort_values("order").iterrows():
        if row["session"] == "V":
            continue
        if bool(row["waited"]) and "blocked" not in seen:
            seen.append("blocked")
        label = RETRYABLE.get(row["sqlstate"])
        if label and label not in seen:
            seen.append(label)
    return ", then ".join(seen) if seen else "snapshot"


# ---- the decisions (observations only) ------------------------------------------------------------


def _g0(tr) -> Verdict:
    f = _final(tr)
    mixed = (f.get(1), f.get(2)) not in {(11, 21), (12, 22)}
    return Verdict(mixed, f"final rows {f}: " + ("writes of T1 and T2 interleaved" if mixed else "one writer's pair"))


def _g1a(tr) -> Verdict:
    seen = [_pairs(tr, s).get(1) for s in ("r2a", "r2b")]
    return Verdict(101 in seen, f"T2 read x = {seen} while T1 wrote 101 and aborted")


def _g1b(tr) -> Verdict:
    seen = [_pairs(tr, s).get(1) for s in ("r2a", "r2b")]
    return Verdict(101 in seen, f"T2 read x = {seen}; 101 was T1's intermediate value")


def _g1c(tr) -> Verdict:
    y, x = _pairs(tr, "r1").get(2), _pairs(tr, "r2").get(1)
    both = y == 22 and x == 11
    return Verdict(both, f"T1 read y = {y}, T2 read x = {x}" + (": each saw the other's write" if both else ""))


def _otv(tr) -> Verdict:
    reads = []
    for s in ("r3a", "r3b", "r3c", "r3d"):
        reads.extend(_pairs(tr, s).items())
    t1_values, initial = {(1, 11), (2, 19)}, {(1, 10), (2, 20)}
    vanished = any(r in initial for i, r0 in enumerate(reads) if r0 in t1_values for r in reads[i + 1 :])
    return Verdict(vanished, f"T3 read {reads}" + ("; T1's effects vanished" if vanished else ""))


def _pmp(tr) -> Verdict:
    first, second = _pairs(tr, "r1a"), _pairs(tr, "r1b")
    new = 3 in second and 3 not in first
    return Verdict(new, f"T1's predicate reads: {first} then {second}")


def _p4(tr) -> Verdict:
    f = _final(tr)
    both = committed(tr, "T1") and committed(tr, "T2")
    lost = both and f.get(1) == 11
    return Verdict(lost, f"both committed: {both}; two increments of 10 left x = {f.get(1)}")


def _g_single(tr) -> Verdict:
    x, y = _pairs(tr, "r1x").get(1), _pairs(tr, "r1y").get(2)
    total = None if x is None or y is None else x + y
    return Verdict(
        total is not None and total != 30, f"T1 read x = {x}, y = {y}: sum {total} (always 30 when committed)"
    )


def _g2_item(tr) -> Verdict:
    r1, r2, f = _pairs(tr, "r1"), _pairs(tr, "r2"), _final(tr)
    cycle = (
        committed(tr, "T1")
        and committed(tr, "T2")
        and r1.get(2) == 20
        and r2.get(1) == 10
        and f.get(1) == 11
        and f.get(2) == 21
    )
    return Verdict(
        cycle, f"T1 read {r1}, T2 read {r2}, final {f}" + ("; each overwrote what the other read" if cycle else "")
    )


def _g2(tr) -> Verdict:
    r1, r2, f = _pairs(tr, "r1"), _pairs(tr, "r2"), _final(tr)
    cycle = committed(tr, "T1") and committed(tr, "T2") and not r1 and not r2 and 3 in f and 4 in f
    return Verdict(
        cycle,
        f"T1 read {r1}, T2 read {r2} (value % 3 = 0), final {f}"
        + ("; each inserted a row the other's predicate missed" if cycle else ""),
    )


CATALOGUE: tuple[Anomaly, ...] = (
    Anomaly(
        "G0",
        "dirty write",
        {
            "T1": {
                "b1": "BEGIN",
                "w1x": "UPDATE {t} SET value = 11 WHERE id = 1",
                "w1y": "UPDATE {t} SET value = 21 WHERE id = 2",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "w2x": "UPDATE {t} SET value = 12 WHERE id = 1",
                "w2y": "UPDATE {t} SET value = 22 WHERE id = 2",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "w1x", "w2x", "w1y", "c1", "w2y", "c2"),
        _g0,
        about="T1 and T2 both write x and y; the final pair must come from one of them",
    ),
    Anomaly(
        "G1a",
        "aborted read",
        {
            "T1": {"b1": "BEGIN", "w1": "UPDATE {t} SET value = 101 WHERE id = 1", "a1": "ROLLBACK"},
            "T2": {
                "b2": "BEGIN",
                "r2a": "SELECT id, value FROM {t} ORDER BY id",
                "r2b": "SELECT id, value FROM {t} ORDER BY id",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "w1", "r2a", "a1", "r2b", "c2"),
        _g1a,
        about="T2 must never see 101, written by T1 which then aborts",
    ),
    Anomaly(
        "G1b",
        "intermediate read",
        {
            "T1": {
                "b1": "BEGIN",
                "w1a": "UPDATE {t} SET value = 101 WHERE id = 1",
                "w1b": "UPDATE {t} SET value = 11 WHERE id = 1",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "r2a": "SELECT id, value FROM {t} ORDER BY id",
                "r2b": "SELECT id, value FROM {t} ORDER BY id",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "w1a", "r2a", "w1b", "c1", "r2b", "c2"),
        _g1b,
        about="T2 must never see 101, T1's value before its final write",
    ),
    Anomaly(
        "G1c",
        "circular information flow",
        {
            "T1": {
                "b1": "BEGIN",
                "w1": "UPDATE {t} SET value = 11 WHERE id = 1",
                "r1": "SELECT id, value FROM {t} WHERE id = 2",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "w2": "UPDATE {t} SET value = 22 WHERE id = 2",
                "r2": "SELECT id, value FROM {t} WHERE id = 1",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "w1", "w2", "r1", "r2", "c1", "c2"),
        _g1c,
        about="T1 and T2 must not each see the other's uncommitted write",
    ),
    Anomaly(
        "OTV",
        "observed transaction vanishes",
        {
            "T1": {
                "b1": "BEGIN",
                "w1x": "UPDATE {t} SET value = 11 WHERE id = 1",
                "w1y": "UPDATE {t} SET value = 19 WHERE id = 2",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "w2x": "UPDATE {t} SET value = 12 WHERE id = 1",
                "w2y": "UPDATE {t} SET value = 18 WHERE id = 2",
                "c2": "COMMIT",
            },
            "T3": {
                "b3": "BEGIN",
                "r3a": "SELECT id, value FROM {t} WHERE id = 1",
                "r3b": "SELECT id, value FROM {t} WHERE id = 2",
                "r3c": "SELECT id, value FROM {t} WHERE id = 2",
                "r3d": "SELECT id, value FROM {t} WHERE id = 1",
                "c3": "COMMIT",
            },
        },
        ("b1", "b2", "b3", "w1x", "w1y", "w2x", "c1", "r3a", "w2y", "r3b", "c2", "r3c", "r3d", "c3"),
        _otv,
        about="once T3 has seen T1's writes it must not later see values from before T1",
    ),
    Anomaly(
        "PMP",
        "predicate-many-preceders",
        {
            "T1": {
                "b1": "BEGIN",
                "r1a": "SELECT id, value FROM {t} WHERE value = 30",
                "r1b": "SELECT id, value FROM {t} WHERE value % 3 = 0",
                "c1": "COMMIT",
            },
            "T2": {"b2": "BEGIN", "i2": "INSERT INTO {t} (id, value) VALUES (3, 30)", "c2": "COMMIT"},
        },
        ("b1", "b2", "r1a", "i2", "c2", "r1b", "c1"),
        _pmp,
        about="T1's two predicate reads must see the same set of rows",
    ),
    Anomaly(
        "P4",
        "lost update",
        {
            "T1": {
                "b1": "BEGIN",
                "r1": "SELECT id, value FROM {t} WHERE id = 1",
                "w1": "UPDATE {t} SET value = 11 WHERE id = 1",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "r2": "SELECT id, value FROM {t} WHERE id = 1",
                "w2": "UPDATE {t} SET value = 11 WHERE id = 1",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "r1", "r2", "w1", "w2", "c1", "c2"),
        _p4,
        about="each reads x = 10 and writes x + 1; if both commit, one increment is lost",
    ),
    Anomaly(
        "G-single",
        "read skew",
        {
            "T1": {
                "b1": "BEGIN",
                "r1x": "SELECT id, value FROM {t} WHERE id = 1",
                "r1y": "SELECT id, value FROM {t} WHERE id = 2",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "r2": "SELECT id, value FROM {t} ORDER BY id",
                "w2x": "UPDATE {t} SET value = 12 WHERE id = 1",
                "w2y": "UPDATE {t} SET value = 18 WHERE id = 2",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "r1x", "r2", "w2x", "w2y", "c2", "r1y", "c1"),
        _g_single,
        about="T2 moves 2 from y to x (sum stays 30); T1 must not see a sum other than 30",
    ),
    Anomaly(
        "G2-item",
        "write skew",
        {
            "T1": {
                "b1": "BEGIN",
                "r1": "SELECT id, value FROM {t} WHERE id IN (1, 2) ORDER BY id",
                "w1": "UPDATE {t} SET value = 11 WHERE id = 1",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "r2": "SELECT id, value FROM {t} WHERE id IN (1, 2) ORDER BY id",
                "w2": "UPDATE {t} SET value = 21 WHERE id = 2",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "r1", "r2", "w1", "w2", "c1", "c2"),
        _g2_item,
        about="each reads both rows and writes the one the other did not: no serial order explains it",
    ),
    Anomaly(
        "G2",
        "anti-dependency cycle",
        {
            "T1": {
                "b1": "BEGIN",
                "r1": "SELECT id, value FROM {t} WHERE value % 3 = 0",
                "i1": "INSERT INTO {t} (id, value) VALUES (3, 30)",
                "c1": "COMMIT",
            },
            "T2": {
                "b2": "BEGIN",
                "r2": "SELECT id, value FROM {t} WHERE value % 3 = 0",
                "i2": "INSERT INTO {t} (id, value) VALUES (4, 42)",
                "c2": "COMMIT",
            },
        },
        ("b1", "b2", "r1", "r2", "i1", "i2", "c1", "c2"),
        _g2,
        about="each reads a predicate, finds nothing, inserts a row matching the other's predicate",
    ),
)

ANOMALIES = tuple(a.key for a in CATALOGUE)
BY_KEY = {a.key: a for a in CATALOGUE}


# ---- the four phenomena of the SQL standard --------------------------------------------------------


def _dirty(tr) -> Verdict:
    v = _pairs(tr, "r2").get(1)
    return Verdict(v == 101, f"T2 read x = {v} while T1's 101 was uncommitted")


def _nonrepeatable(tr) -> Verdict:
    a, b = _pairs(tr, "r1a").get(1), _pairs(tr, "r1b").get(1)
    return Verdict(a != b, f"T1 read x = {a}, then x = {b}")


def _phantom(tr) -> Verdict:
    a, b = _pairs(tr, "r1a"), _pairs(tr, "r1b")
    return Verdict(a != b, f"T1's predicate read {a}, then {b}")


PHENOMENA: tuple[Anomaly, ...] = (
    Anomaly(
        "dirty_read",
        "dirty read",
        {
            "T1": {"b1": "BEGIN", "w1": "UPDATE {t} SET value = 101 WHERE id = 1", "a1": "ROLLBACK"},
            "T2": {"b2": "BEGIN", "r2": "SELECT id, value FROM {t} WHERE id = 1", "c2": "COMMIT"},
        },
        ("b1", "b2", "w1", "r2", "a1", "c2"),
        _dirty,
        about="T2 reads a row T1 changed and has not committed",
    ),
    Anomaly(
        "nonrepeatable_read",
        "non-repeatable read",
        {
            "T1": {
                "b1": "BEGIN",
                "r1a": "SELECT id, value FROM {t} WHERE id = 1",
                "r1b": "SELECT id, value FROM {t} WHERE id = 1",
                "c1": "COMMIT",
            },
            "T2": {"b2": "BEGIN", "w2": "UPDATE {t} SET value = 11 WHERE id = 1", "c2": "COMMIT"},
        },
        ("b1", "b2", "r1a", "w2", "c2", "r1b", "c1"),
        _nonrepeatable,
        about="T1 reads a row twice; T2 changes it and commits in between",
    ),
    Anomaly(
        "phantom_read",
        "phantom read",
        {
            "T1": {
                "b1": "BEGIN",
                "r1a": "SELECT id, value FROM {t} WHERE value > 15 ORDER BY id",
                "r1b": "SELECT id, value FROM {t} WHERE value > 15 ORDER BY id",
                "c1": "COMMIT",
            },
            "T2": {"b2": "BEGIN", "i2": "INSERT INTO {t} (id, value) VALUES (3, 30)", "c2": "COMMIT"},
        },
        ("b1", "b2", "r1a", "i2", "c2", "r1b", "c1"),
        _phantom,
        about="T1 runs a predicate query twice; T2 inserts a matching row and commits in between",
    ),
    Anomaly(
        "serialization_anomaly",
        "serialization anomaly",
        BY_KEY["G2-item"].sessions,
        BY_KEY["G2-item"].permutation,
        _g2_item,
        about="write skew: committed result no serial order gives",
    ),
)

# What the SQL standard *allows* at each level (True = the phenomenon may occur): for comparison
# with the measured verdicts, never used to reach them.
STANDARD_ALLOWS = {
    "read uncommitted": {
        "dirty_read": True,
        "nonrepeatable_read": True,
        "phantom_read": True,
        "serialization_anomaly": True,
    },
    "read committed": {
        "dirty_read": False,
        "nonrepeatable_read": True,
        "phantom_read": True,
        "serialization_anomaly": True,
    },
    "repeatable read": {
        "dirty_read": False,
        "nonrepeatable_read": False,
        "phantom_read": True,
        "serialization_anomaly": True,
    },
    "serializable": {
        "dirty_read": False,
        "nonrepeatable_read": False,
        "phantom_read": False,
        "serialization_anomaly": False,
    },
}


# ---- running ---------------------------------------------------------------------------------------


def table_name(schema: str, anomaly: Anomaly, level: str) -> str:
    """``<schema>.<anomaly>_<level>``, e.g. ``wb_isolation.g2_item_serializable``."""
    slug = re.sub(r"[^a-z0-9]+", "_", f"{anomaly.key}_{level}".lower()).strip("_")
    return f"{schema}.{slug}"


def scenario(anomaly: Anomaly, level: str, schema: str, *, lock_timeout: str = "3s"):
    """The ``Scenario`` for one anomaly at one level, on its own table, with a verifier step ``final``."""
    from .sessions import Scenario

    t = table_name(schema, anomaly, level)
    values = ", ".join(f"({i}, {v})" for i, v in anomaly.rows)
    sessions = {
        name: {"isolation": level, "steps": {step: sql.format(t=t) for step, sql in steps.items()}}
        for name, steps in anomaly.sessions.items()
    }
    sessions["V"] = {"steps": {"final": f"SELECT id, value FROM {t} ORDER BY id"}}
    return Scenario(
        name=f"{anomaly.key}_{level}".replace(" ", "_").replace("-", "_").lower(),
        setup=[
            f"DROP TABLE IF EXISTS {t}",
            f"CREATE TABLE {t} (id int PRIMARY KEY, value int NOT NULL)",
            f"INSERT INTO {t} (id, value) VALUES {values}",
        ],
        teardown=[f"DROP TABLE IF EXISTS {t}"],
        sessions=sessions,
        lock_timeout=lock_timeout,
    )


def run(anomaly: Anomaly | str, level: str, schema: str) -> Run:
    """Run one anomaly at one level and decide, from the transcript, whether it occurred and how it was prevented."""
    anomaly = BY_KEY[anomaly] if isinstance(anomaly, str) else anomaly
    tr = scenario(anomaly, level, schema).run([*anomaly.permutation, "final"])
    verdict = anomaly.decide(tr)
    return Run(anomaly, level, verdict, how(tr, verdict.occurred), tr)


def run_all(schema: str, catalogue=CATALOGUE, levels=LEVELS, *, parallel: int = 1) -> dict[tuple[str, str], Run]:
    """Every anomaly of ``catalogue`` at every level: {(anomaly key, level): Run}.

    ``parallel`` > 1 runs that many scenarios at a time: each has its own table and connections,
    so they cannot see or block each other, and each interleaving stays scripted.
    """
    cells = [(a, level) for level in levels for a in catalogue]
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="wb_anomalies") as pool:
        done = list(pool.map(lambda c: run(c[0], c[1], schema), cells))
    return {(a.key, level): r for (a, level), r in zip(cells, done, strict=True)}


def matrix(runs: dict[tuple[str, str], Run], value: str = "outcome") -> pd.DataFrame:
    """Levels × anomalies table of ``outcome``, ``how``, ``occurred`` or ``evidence``."""
    keys = list(dict.fromkeys(k for k, _ in runs))
    levels = list(dict.fromkeys(lv for _, lv in runs))

    def cell(r: Run):
        return {"outcome": r.outcome, "how": r.how, "occurred": r.verdict.occurred, "evidence": r.verdict.evidence}[
            value
        ]

    return pd.DataFrame([[cell(runs[(k, lv)]) for k in keys] for lv in levels], index=levels, columns=keys)
