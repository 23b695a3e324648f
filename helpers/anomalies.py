"""The anomaly catalogue of Adya / Berenson et al. (as tested by Hermitage): the instrument and the verdicts.

The scripts themselves live in chapter 04's cells, where a learner reads, edits and re-runs them:
one ordered ``T1:`` / ``T2:`` script per anomaly (``Scenario.from_script``), on a two-row table
``{t}`` holding ``(1, 10), (2, 20)`` (*x* and *y*). This module keeps what is not the lesson:

- ``Anomaly(key, script)``: a script with its name, what is checked, and its ``decide`` function,
  which reads the transcript (values the sessions read, their errors, the final rows) and says whether
  the anomaly *occurred*. Nothing here knows what PostgreSQL is expected to do at a given level:
  the verdicts are observations. ``decide`` reads steps by the names the scripts give them
  (``-- r1``, ``-- w2x``, ...): keep those names when you edit a script.
- ``run(anomaly, level, schema)``: the scenario at one level, on its own table ``<schema>.<key>_<level abbreviation>`` (``g2_item_ser``),
  with a verifier session ``V`` that reads the final rows (step ``final``); ``run_all`` and ``matrix``.
- ``how(transcript)``: how a prevented anomaly was prevented (``PREVENTED_BY`` labels the SQLSTATEs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

from .scenario import ISOLATION_LEVELS, Scenario, parse_script
from .scratch import scratch_suffix

#: how an anomaly was prevented, by the SQLSTATE a step got (not what to retry: that is ``retrying.RETRYABLE``)
PREVENTED_BY = {"40001": "serialization failure", "40P01": "deadlock"}
#: every run's table starts with these rows: x = (1, 10), y = (2, 20)
SETUP = (
    "CREATE TABLE {t} (id int PRIMARY KEY, value int NOT NULL)",
    "INSERT INTO {t} (id, value) VALUES (1, 10), (2, 20)",
)
FINAL = "V: SELECT id, value FROM {t} ORDER BY id  -- final"
_ABBREV = {"read uncommitted": "ru", "read committed": "rc", "repeatable read": "rr", "serializable": "ser"}


@dataclass(frozen=True)
class Verdict:
    """Whether the anomaly occurred, and the observation that says so."""

    occurred: bool
    evidence: str


@dataclass(frozen=True)
class Anomaly:
    """One anomaly: an ordered script (``T1: ...`` lines, ``{t}`` for the table) and the decision that reads its run."""

    key: str
    script: str
    name: str = ""
    about: str = ""
    decide: Callable[[object], Verdict] | None = None

    def __post_init__(self):
        known = KNOWN.get(self.key)
        if known is None and self.decide is None:
            raise KeyError(f"no decision for {self.key!r}: pass decide=..., or use one of {sorted(KNOWN)}")
        for attr, value in zip(("name", "about", "decide"), known or (None, None, None), strict=True):
            if not getattr(self, attr) and value is not None:
                object.__setattr__(self, attr, value)
        parse_script(self.script)  # a malformed script is refused here, not in the middle of a matrix

    @property
    def sessions(self) -> list[str]:
        return list(dict.fromkeys(who for who, _, _ in parse_script(self.script)[2]))

    @property
    def permutation(self) -> tuple[str, ...]:
        return tuple(step for _, step, _ in parse_script(self.script)[2])


def catalogue(scripts: dict[str, str]) -> tuple[Anomaly, ...]:
    """``{key: script}`` -> Anomalies, in the dict's order, each with its name, about and decision."""
    return tuple(Anomaly(key, script) for key, script in scripts.items())


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
        label = PREVENTED_BY.get(row["sqlstate"])
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


#: key -> (name, what is checked, decision): what an ``Anomaly`` of that key is judged by
KNOWN: dict[str, tuple[str, str, Callable]] = {
    "G0": ("dirty write", "T1 and T2 both write x and y; the final pair must come from one of them", _g0),
    "G1a": ("aborted read", "T2 must never see 101, written by T1 which then aborts", _g1a),
    "G1b": ("intermediate read", "T2 must never see 101, T1's value before its final write", _g1b),
    "G1c": ("circular information flow", "T1 and T2 must not each see the other's uncommitted write", _g1c),
    "OTV": (
        "observed transaction vanishes",
        "once T3 has seen T1's writes it must not later see values from before T1",
        _otv,
    ),
    "PMP": ("predicate-many-preceders", "T1's two predicate reads must see the same set of rows", _pmp),
    "P4": ("lost update", "each reads x = 10 and writes x + 1; if both commit, one increment is lost", _p4),
    "G-single": ("read skew", "T2 moves 2 from y to x (sum stays 30); T1 must not see a sum other than 30", _g_single),
    "G2-item": (
        "write skew",
        "each reads both rows and writes the one the other did not: no serial order explains it",
        _g2_item,
    ),
    "G2": (
        "anti-dependency cycle",
        "each reads a predicate, finds nothing, inserts a row matching the other's predicate",
        _g2,
    ),
    # the four phenomena of the SQL standard
    "dirty_read": ("dirty read", "T2 reads a row T1 changed and has not committed", _dirty),
    "nonrepeatable_read": (
        "non-repeatable read",
        "T1 reads a row twice; T2 changes it and commits in between",
        _nonrepeatable,
    ),
    "phantom_read": (
        "phantom read",
        "T1 runs a predicate query twice; T2 inserts a matching row and commits in between",
        _phantom,
    ),
    "serialization_anomaly": (
        "serialization anomaly",
        "write skew: a committed result no serial order gives",
        _g2_item,
    ),
}
ANOMALIES = ("G0", "G1a", "G1b", "G1c", "OTV", "PMP", "P4", "G-single", "G2-item", "G2")
PHENOMENA = ("dirty_read", "nonrepeatable_read", "phantom_read", "serialization_anomaly")

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


def table_name(anomaly: Anomaly, level: str) -> str:
    """``<anomaly>_<level>`` in lower case, e.g. ``g2_item_ser``: each run's own table in the schema."""
    return re.sub(r"[^a-z0-9]+", "_", f"{anomaly.key}_{_ABBREV[level]}".lower()).strip("_")


def scenario(anomaly: Anomaly, level: str, schema: str, *, lock_timeout: str = "3s") -> Scenario:
    """The ``Scenario`` for one anomaly at one level, on its own table, with a verifier step ``final``.

    Its name carries this kernel's suffix, so two kernels running the catalogue at once never share an
    application_name.
    """
    t = table_name(anomaly, level)
    return Scenario.from_script(
        f"{t}_{scratch_suffix()}",
        f"{anomaly.script}\n{FINAL}",
        setup=["DROP TABLE IF EXISTS {t}", *SETUP],
        teardown=["DROP TABLE IF EXISTS {t}"],
        isolation={s: level for s in anomaly.sessions},
        names={"t": (schema, t)},
        lock_timeout=lock_timeout,
    )


def run(anomaly: Anomaly, level: str, schema: str) -> Run:
    """Run one anomaly at one level and decide, from the transcript, whether it occurred and how it was prevented."""
    tr = scenario(anomaly, level, schema).run()
    verdict = anomaly.decide(tr)
    return Run(anomaly, level, verdict, how(tr, verdict.occurred), tr)


def run_all(
    schema: str, catalogue: tuple[Anomaly, ...], levels=ISOLATION_LEVELS, *, parallel: int = 1
) -> dict[tuple[str, str], Run]:
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
