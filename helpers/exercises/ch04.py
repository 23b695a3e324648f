"""Exercises of chapter 04 (isolation levels): scripts judged by running them under the scheduler.

Each answer is a function returning an ordered script (``Scenario.from_script``), with ``{doctors}`` or
``{bookings}`` for the judge's own table. The judge runs it in this kernel's scratch schema (dropped in
a ``finally``), reads the final rows and, after each session's ``BEGIN``, the level the server runs the
transaction at: counts, rows and SQLSTATEs, never a timing.
"""

from __future__ import annotations

from ..scenario import Scenario, ScenarioError, parse_script
from ..scratch import scratch_name
from . import exercise

DOCTORS_SETUP = [
    "CREATE TABLE {doctors} (name text PRIMARY KEY, shift int NOT NULL, on_call boolean NOT NULL)",
    "INSERT INTO {doctors} VALUES ('alice', 1, true), ('bob', 1, true), ('carol', 2, true)",
]
BOOKINGS_SETUP = ["CREATE TABLE {bookings} (id serial PRIMARY KEY, room int NOT NULL, slot int NOT NULL, who text)"]


def _with_level_probes(script: str) -> str:
    """The script with ``<session>: SHOW transaction_isolation -- level_<session>`` after each session's BEGIN."""
    _, _, steps = parse_script(script)
    lines, probed = [], set()
    for who, name, sql in steps:
        body = sql.replace("\n", "\n    ")
        lines.append(f"{who}: {body}  -- {name}")
        if who not in probed and sql.strip().upper().startswith(("BEGIN", "START TRANSACTION")):
            probed.add(who)
            lines.append(f"{who}: SHOW transaction_isolation  -- level_{who.lower()}")
    return "\n".join(lines)


def _overlap(tr, sessions: tuple[str, str]) -> bool:
    """True when each session's first statement after BEGIN was issued before the other session's last step."""
    df = tr.df
    first, last = {}, {}
    for s in sessions:
        mine = df[(df["session"] == s) & ~df["step"].str.startswith("level_")].sort_values("issued")
        data = mine[~mine["sql"].str.strip().str.upper().str.startswith(("BEGIN", "START"))]
        if data.empty:
            return False
        first[s], last[s] = int(data["issued"].iloc[0]), int(mine["issued"].iloc[-1])
    a, b = sessions
    return first[a] < last[b] and first[b] < last[a]


def _run(answer, table: str, setup: list[str], sessions: tuple[str, str], final: str, engine):
    from ..scratch import drop_lab_schema
    from ..seed import lab_schema

    script = answer()
    if not isinstance(script, str):
        raise TypeError("the function should return the script, a string")
    schema = lab_schema(engine, "ex04")
    try:
        sc = Scenario.from_script(
            scratch_name(f"ex_{table}"),
            f"{_with_level_probes(script)}\nV: {final}  -- final",
            setup=setup,
            teardown=["DROP TABLE IF EXISTS {" + table + "}"],
            names={table: (schema, table)},
            lock_timeout="2s",
        )
        missing = set(sessions) - set(sc.sessions)
        if missing:
            raise ScenarioError(f"the script has no session {sorted(missing)}")
        return sc.run()
    finally:
        drop_lab_schema(engine, schema)


def _levels(tr, sessions) -> dict[str, str | None]:
    return {s: (tr.value(f"level_{s.lower()}") if f"level_{s.lower()}" in tr.results else None) for s in sessions}


def _errors(tr, sessions) -> list[str]:
    df = tr.df
    bad = df[df["session"].isin(sessions) & df["sqlstate"].notna()]
    return [f"{r.step}: {r.sqlstate}" for r in bad.itertuples()]


# ----------------------------------------------------------------------------- exercise 1: doctors
def solution_doctors_script():
    """Lock the rows the decision reads: Bob's check waits for Alice's transaction, then sees one doctor."""
    return """
        Alice: BEGIN
        Bob:   BEGIN
        Alice: SELECT name FROM {doctors} WHERE shift = 1 AND on_call ORDER BY name FOR UPDATE
        Bob:   SELECT name FROM {doctors} WHERE shift = 1 AND on_call ORDER BY name FOR UPDATE
        Alice: UPDATE {doctors} SET on_call = false WHERE name = 'alice'
                 AND (SELECT count(*) FROM {doctors} WHERE shift = 1 AND on_call) >= 2
        Alice: COMMIT
        Bob:   UPDATE {doctors} SET on_call = false WHERE name = 'bob'
                 AND (SELECT count(*) FROM {doctors} WHERE shift = 1 AND on_call) >= 2
        Bob:   COMMIT
    """


def wrong_doctors_script():
    """Plausible but wrong: repeatable read. A snapshot does not stop write skew: nobody writes the same row."""
    return """
        Alice: BEGIN ISOLATION LEVEL REPEATABLE READ
        Bob:   BEGIN ISOLATION LEVEL REPEATABLE READ
        Alice: SELECT name FROM {doctors} WHERE shift = 1 AND on_call ORDER BY name
        Bob:   SELECT name FROM {doctors} WHERE shift = 1 AND on_call ORDER BY name
        Alice: UPDATE {doctors} SET on_call = false WHERE name = 'alice'
                 AND (SELECT count(*) FROM {doctors} WHERE shift = 1 AND on_call) >= 2
        Bob:   UPDATE {doctors} SET on_call = false WHERE name = 'bob'
                 AND (SELECT count(*) FROM {doctors} WHERE shift = 1 AND on_call) >= 2
        Alice: COMMIT
        Bob:   COMMIT
    """


@exercise(
    "04",
    "isolation_doctors_without_serializable",
    "Fix write skew without SERIALIZABLE",
    solution=solution_doctors_script,
    wrong=wrong_doctors_script,
    hint="neither transaction writes a row the other wrote, so no level below serializable makes them conflict; "
    "lock the rows the check reads (SELECT ... FOR UPDATE), and let the second doctor's update come after the "
    "first one's COMMIT in the script",
)
def judge_doctors(answer, engine):
    sessions = ("Alice", "Bob")
    tr = _run(
        answer,
        "doctors",
        DOCTORS_SETUP,
        sessions,
        "SELECT name FROM {doctors} WHERE shift = 1 AND on_call ORDER BY name",
        engine,
    )
    on_call = [r[0] for r in tr.rows("final") or []]
    levels = _levels(tr, sessions)
    errors = _errors(tr, sessions)
    measured = {"on_call": on_call, "levels": levels, "errors": errors, "overlap": _overlap(tr, sessions)}
    if "serializable" in levels.values():
        return False, f"a transaction ran at serializable ({levels}): solve it without", measured
    if None in levels.values():
        return False, "each doctor's transaction starts with BEGIN", measured
    if not measured["overlap"]:
        return False, "the two transactions no longer overlap: keep both checks before either COMMIT", measured
    if errors:
        return False, f"a transaction failed ({', '.join(errors)}): the fix should not need a retry", measured
    if not on_call:
        return False, "both doctors went off call: nobody is on call for shift 1 (write skew)", measured
    if on_call == ["alice", "bob"]:
        return False, "nobody went off call: one of them should be able to", measured
    return True, f"one doctor went off call and {on_call[0]} stayed, at {sorted(set(levels.values()))}", measured


# ----------------------------------------------------------------------------- exercise 2: booking
def solution_booking_script():
    """A transaction-level advisory lock on the slot's key: the second clerk waits, then finds the booking."""
    return """
        A: BEGIN
        B: BEGIN
        A: SELECT pg_advisory_xact_lock(1, 9)
        B: SELECT pg_advisory_xact_lock(1, 9)
        A: INSERT INTO {bookings} (room, slot, who) SELECT 1, 9, 'ann'
             WHERE NOT EXISTS (SELECT FROM {bookings} WHERE room = 1 AND slot = 9)
        A: COMMIT
        B: INSERT INTO {bookings} (room, slot, who) SELECT 1, 9, 'ben'
             WHERE NOT EXISTS (SELECT FROM {bookings} WHERE room = 1 AND slot = 9)
        B: COMMIT
    """


def wrong_booking_script():
    """Plausible but wrong: FOR UPDATE on the check. No row matches, so it locks nothing."""
    return """
        A: BEGIN
        B: BEGIN
        A: SELECT id FROM {bookings} WHERE room = 1 AND slot = 9 FOR UPDATE
        B: SELECT id FROM {bookings} WHERE room = 1 AND slot = 9 FOR UPDATE
        A: INSERT INTO {bookings} (room, slot, who) SELECT 1, 9, 'ann'
             WHERE NOT EXISTS (SELECT FROM {bookings} WHERE room = 1 AND slot = 9)
        B: INSERT INTO {bookings} (room, slot, who) SELECT 1, 9, 'ben'
             WHERE NOT EXISTS (SELECT FROM {bookings} WHERE room = 1 AND slot = 9)
        A: COMMIT
        B: COMMIT
    """


@exercise(
    "04",
    "isolation_booking_advisory_lock",
    "No double booking, with an advisory lock",
    solution=solution_booking_script,
    wrong=wrong_booking_script,
    hint="FOR UPDATE locks only rows that exist, and here the check finds none; lock the slot itself with "
    "SELECT pg_advisory_xact_lock(1, 9) before checking, and let the second clerk's insert come after the "
    "first one's COMMIT",
)
def judge_booking(answer, engine):
    sessions = ("A", "B")
    tr = _run(
        answer,
        "bookings",
        BOOKINGS_SETUP,
        sessions,
        "SELECT who FROM {bookings} WHERE room = 1 AND slot = 9 ORDER BY who",
        engine,
    )
    booked = [r[0] for r in tr.rows("final") or []]
    levels = _levels(tr, sessions)
    errors = _errors(tr, sessions)
    advisory = bool(tr.df["sql"].str.contains("pg_advisory", case=False).any())
    measured = {"booked": booked, "levels": levels, "errors": errors, "overlap": _overlap(tr, sessions)}
    measured["advisory_lock"] = advisory
    if "serializable" in levels.values():
        return False, f"a transaction ran at serializable ({levels}): solve it without", measured
    if None in levels.values():
        return False, "each clerk's transaction starts with BEGIN", measured
    if not measured["overlap"]:
        return (
            False,
            "the two transactions no longer overlap: keep each first statement before the other's COMMIT",
            measured,
        )
    if errors:
        return False, f"a transaction failed ({', '.join(errors)}): the fix should not need a retry", measured
    if len(booked) != 1:
        return False, f"room 1 at 9:00 is booked {len(booked)} times ({booked})", measured
    if not advisory:
        return False, "booked once, but not with an advisory lock", measured
    return True, f"booked once (by {booked[0]}), with an advisory lock, at {sorted(set(levels.values()))}", measured
