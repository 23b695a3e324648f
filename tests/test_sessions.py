"""The Scenario scheduler against the real server: blocking, errors, determinism, no leftovers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text

from helpers import Scenario, lab_schema, setup
from helpers.scenario import ScenarioError


@pytest.fixture(scope="module")
def schema():
    engine = setup(quiet=True)
    return lab_schema(engine, "locking")


def table(schema: str, name: str, rows: str = "(1, 10), (2, 20)"):
    t = f"{schema}.{name}"
    return (
        t,
        [
            f"DROP TABLE IF EXISTS {t}",
            f"CREATE TABLE {t} (id int PRIMARY KEY, v int)",
            f"INSERT INTO {t} VALUES {rows}",
        ],
        [f"DROP TABLE IF EXISTS {t}"],
    )


def lost_update(schema: str, isolation: str | None = None) -> Scenario:
    t, up, down = table(schema, "t_lost")
    extra = {"isolation": isolation} if isolation else {}
    return Scenario(
        name="t_lost",
        setup=up,
        teardown=down,
        sessions={
            "T1": {
                **extra,
                "steps": {
                    "b1": "BEGIN",
                    "r1": f"SELECT v FROM {t} WHERE id = 1",
                    "w1": f"UPDATE {t} SET v = 11 WHERE id = 1",
                    "c1": "COMMIT",
                },
            },
            "T2": {
                **extra,
                "steps": {
                    "b2": "BEGIN",
                    "r2": f"SELECT v FROM {t} WHERE id = 1",
                    "w2": (f"UPDATE {t} SET v = %(v)s WHERE id = 1", {"v": 12}),
                    "c2": "COMMIT",
                    "f2": f"SELECT v FROM {t} WHERE id = 1",
                },
            },
        },
    )


PERM = ["b1", "b2", "r1", "r2", "w1", "w2", "c1", "c2", "f2"]


def test_blocked_step_is_detected_and_collected_after_its_release(schema):
    tr = lost_update(schema).run(PERM)
    assert tr.value("r1") == 10 and tr.value("r2") == 10
    assert not tr.waited("w1")
    assert tr.waited("w2") and tr.blocked_by("w2") == ["T1"]
    df = tr.df.set_index("step")
    assert df.loc["w2", "finished_after"] == "c1"
    assert df.loc["w2", "order"] == df.loc["c1", "order"] + 1  # collected right after its release
    assert tr.sqlstate("w2") is None and tr.value("f2") == 12  # read committed: T2 overwrote T1
    assert list(tr.df.columns[:10]) == [
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
    ]
    assert "blocked by T1" in repr(tr) and "<table>" in tr._repr_html_()


def test_isolation_level_per_session_and_serialization_failure(schema):
    tr = lost_update(schema, "repeatable read").run(PERM)
    assert tr.sqlstate("w2") == "40001"
    assert tr.rows("c2") is None and tr.df.set_index("step").loc["c2", "status"] == "ROLLBACK"
    assert tr.value("f2") == 11
    t, up, down = table(schema, "t_iso")
    tr = Scenario(
        "t_iso", up, down, {"S": {"isolation": "serializable", "steps": {"s": "SHOW transaction_isolation"}}}
    ).run()
    assert tr.value("s") == "serializable"


def test_deadlock_gives_40P01_to_exactly_one_session(schema):
    t, up, down = table(schema, "t_dead")
    sc = Scenario(
        "t_dead",
        up,
        down,
        {
            "A": {
                "steps": {
                    "a0": "BEGIN",
                    "a1": f"UPDATE {t} SET v = v + 1 WHERE id = 1",
                    "a2": f"UPDATE {t} SET v = v + 1 WHERE id = 2",
                    "a3": "COMMIT",
                }
            },
            "B": {
                "steps": {
                    "b0": "BEGIN",
                    "b1": f"UPDATE {t} SET v = v + 1 WHERE id = 2",
                    "b2": f"UPDATE {t} SET v = v + 1 WHERE id = 1",
                    "b3": "COMMIT",
                }
            },
        },
    )
    runs = [sc.run(["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]) for _ in range(3)]
    tr = runs[0]
    states = [tr.sqlstate("a2"), tr.sqlstate("b2")]
    assert sorted(states, key=str) == ["40P01", None]
    assert tr.waited("a2") and tr.waited("b2")
    assert all(r.signature() == tr.signature() for r in runs[1:])  # the same victim every time


def test_errors_keep_their_sqlstate_and_later_steps_still_run(schema):
    t, up, down = table(schema, "t_err", "(1, 0)")
    sc = Scenario(
        "t_err",
        up,
        down,
        {
            "A": {
                "steps": {
                    "a0": "BEGIN",
                    "a1": f"SELECT v FROM {t} FOR UPDATE",
                    "a2": "SELEC 1",
                    "a3": "SELECT 1",
                    "a4": "ROLLBACK",
                    "a5": "SELECT pg_sleep(3)",
                }
            },
            "B": {"steps": {"b0": "BEGIN", "b1": f"SELECT v FROM {t} FOR UPDATE NOWAIT", "b2": "ROLLBACK"}},
        },
        lock_timeout="1s",
        statement_timeout="1500ms",
    )
    tr = sc.run(["a0", "a1", "b0", "b1", "b2", "a2", "a3", "a4", "a5"])
    assert [tr.sqlstate(s) for s in ["b1", "a2", "a3", "a4", "a5"]] == ["55P03", "42601", "25P02", None, "57014"]
    assert not tr.waited("b1")


def test_lock_timeout_bounds_a_wait_left_at_the_end(schema):
    t, up, down = table(schema, "t_end", "(1, 0)")
    sc = Scenario(
        "t_end",
        up,
        down,
        {
            "A": {"steps": {"a0": "BEGIN", "a1": f"UPDATE {t} SET v = 1"}},
            "B": {"steps": {"b1": f"UPDATE {t} SET v = 2", "b2": "SELECT 1"}},
        },
        lock_timeout="500ms",
    )
    tr = sc.run(["a0", "a1", "b1", "b2"])  # b2 waits for b1, which only the timeout ends
    assert tr.waited("b1") and tr.sqlstate("b1") == "55P03"
    assert tr.df.set_index("step").loc["b1", "finished_after"] is None
    assert tr.value("b2") == 1


def test_bad_scenarios_are_refused():
    with pytest.raises(ScenarioError):
        Scenario("x", sessions={"A": {"steps": {"s": "SELECT 1"}}, "B": {"steps": {"s": "SELECT 2"}}})
    with pytest.raises(ScenarioError):
        Scenario("x", sessions={"A": {"isolation": "snapshot", "steps": {"s": "SELECT 1"}}})
    with pytest.raises(ScenarioError):
        Scenario("x", sessions={"A": {"steps": {"s": "SELECT 1"}}}).run(["nope"])


def leftovers(engine, sc: Scenario, tr) -> tuple[int, int]:
    with engine.connect() as conn:
        act = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :p"),
            {"p": f"wb_scenario_{sc.name}_%"},
        ).scalar()
        lk = conn.execute(
            text("SELECT count(*) FROM pg_locks WHERE pid = ANY(:pids)"), {"pids": list(tr.pids.values())}
        ).scalar()
    return act, lk


def test_no_connection_transaction_or_lock_remains(schema):
    engine = setup(quiet=True)
    t, up, down = table(schema, "t_left", "(1, 0)")
    sc = Scenario(
        "t_left",
        up,
        down,
        {
            "A": {"steps": {"a0": "BEGIN", "a1": f"LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"}},  # never committed
            "B": {"steps": {"b0": "BEGIN", "b1": f"SELECT * FROM {t}"}},  # blocked at the end
        },
        lock_timeout="300ms",
    )
    tr = sc.run(["a0", "a1", "b0", "b1"])
    assert tr.waited("b1") and tr.sqlstate("b1") == "55P03"
    assert len(tr.pids) == 2 and leftovers(engine, sc, tr) == (0, 0)
    assert not hasattr(sc, "pids") and not hasattr(sc, "_results")  # the spec keeps nothing of its run
    with engine.connect() as conn:  # teardown ran although a transaction was left open
        assert conn.execute(text("SELECT to_regclass(:t)"), {"t": t}).scalar() is None
    bad = Scenario("t_left", ["SELECT no_such_column"], down, {"A": {"steps": {"a": "SELECT 1"}}})
    with pytest.raises(Exception, match="no_such_column"):
        bad.run()
    assert leftovers(engine, sc, tr) == (0, 0)


def test_same_scenario_same_transcript_20_times_with_the_other_core_busy(schema):
    t, up, down = table(schema, "t_det", "(1, 0), (2, 0)")
    sc = Scenario(
        "t_det",
        up,
        down,
        {
            "T1": {
                "steps": {
                    "b1": "BEGIN",
                    "u1": f"UPDATE {t} SET v = v + 1 WHERE id = 1",
                    "s1": f"SELECT id, v FROM {t} WHERE id = 2 FOR SHARE",
                    "c1": "COMMIT",
                }
            },
            "T2": {
                "steps": {
                    "b2": "BEGIN",
                    "u2": f"UPDATE {t} SET v = v + 10 WHERE id = 1",
                    "c2": "COMMIT",
                    "r2": f"SELECT sum(v) FROM {t}",
                }
            },
            "T3": {
                "isolation": "repeatable read",
                "steps": {
                    "b3": "BEGIN",
                    "r3": f"SELECT v FROM {t} WHERE id = 1",
                    "u3": f"UPDATE {t} SET v = v + 100 WHERE id = 2",
                    "c3": "COMMIT",
                },
            },
        },
    )
    perm = ["b1", "b2", "b3", "r3", "u1", "u2", "s1", "u3", "c1", "c2", "c3", "r2"]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runs = [sc.run(perm) for _ in range(20)]
    finally:
        busy.kill()
        busy.wait()
    first = runs[0].signature()
    assert all(r.signature() == first for r in runs[1:])
    t0 = runs[0]
    assert t0.waited("u2") and t0.blocked_by("u2") == ["T1"]
    assert t0.waited("u3") and t0.blocked_by("u3") == ["T1"] and t0.sqlstate("u3") is None
    assert t0.value("r2") == 111


SCRIPT = """
    setup: CREATE TABLE t_script (id int PRIMARY KEY, v int)
    setup: INSERT INTO t_script VALUES (1, 10), (2, 20)
    T1: BEGIN
    T2: BEGIN
    T1: SELECT v FROM t_script WHERE id = 1        -- r1
    T2: SELECT v FROM t_script WHERE id = 1        -- r2
    T1: UPDATE t_script SET v = 11 WHERE id = 1    -- w1
    T2: UPDATE t_script
          SET v = %(v)s WHERE id = 1               -- w2
    T1: COMMIT
    T2: COMMIT
    V: SELECT v FROM t_script WHERE id = 1         -- final
    teardown: DROP TABLE t_script
"""


def test_an_ordered_script_is_the_permutation_and_reads_like_hermitage(schema):
    sc = Scenario.from_script(
        "t_script",
        SCRIPT,
        schema=schema,
        isolation={"T1": "repeatable read", "T2": "repeatable read"},
        params={"v": 12},
    )
    assert sc.permutation == ["t1_1", "t2_1", "r1", "r2", "w1", "w2", "t1_4", "t2_4", "final"]
    assert sc.sessions["T1"]["isolation"] == "repeatable read" and sc.sessions["V"]["isolation"] is None
    assert sc.sessions["T2"]["steps"]["w2"] == ("UPDATE t_script\nSET v = %(v)s WHERE id = 1", {"v": 12})
    tr = sc.run()
    assert tr.waited("w2") and tr.blocked_by("w2") == ["T1"] and tr.sqlstate("w2") == "40001"
    assert tr.value("final") == 11
    # the same steps in another order: T1 commits before T2 reads, so T2 sees 11 and its write wins
    other = sc.run(["t1_1", "r1", "w1", "t1_4", "t2_1", "r2", "w2", "t2_4", "final"])
    assert other.value("r2") == 11 and not other.waited("w2") and other.value("final") == 12
    again = Scenario.from_script(
        "t_script",
        sc.script(),
        schema=schema,
        params={"v": 12},
        isolation={"T1": "repeatable read", "T2": "repeatable read"},
    )
    assert again.run().signature() == tr.signature()


def test_identifiers_are_quoted_not_pasted(schema):
    sc = Scenario.from_script(
        "t_names",
        """
        setup: CREATE TABLE {t} (id int PRIMARY KEY)
        A: SELECT count(*) FROM {t}   -- n
        teardown: DROP TABLE {t}
        """,
        names={"t": (schema, "Odd Name")},
    )
    tr = sc.run()
    assert tr.value("n") == 0 and f'"{schema}"."Odd Name"' in tr.df.loc[0, "sql"]


def test_bad_scripts_are_refused():
    with pytest.raises(ScenarioError, match="expected"):
        Scenario.from_script("x", "T1 UPDATE t SET v = 1")
    with pytest.raises(ScenarioError, match="used twice"):
        Scenario.from_script("x", "T1: SELECT 1  -- a\nT2: SELECT 2  -- a")
    with pytest.raises(ScenarioError, match="expected"):
        Scenario.from_script("x", "  SELECT 1\nT1: SELECT 2")


def test_a_wait_on_a_backend_outside_the_scenario_is_not_a_block_of_the_script(schema):
    """pg_blocking_pids is filtered to the scenario's own backends (as in PostgreSQL's isolation tester)."""
    import threading

    import psycopg

    from helpers import psycopg_conninfo

    sc = Scenario.from_script(
        "t_outside",
        """
        A: BEGIN
        A: SELECT id FROM t_outside WHERE id = 1 FOR UPDATE   -- take
        A: COMMIT
        """,
        schema=schema,
    )
    with psycopg.connect(**psycopg_conninfo(), autocommit=True) as outsider:
        outsider.execute(f"CREATE TABLE {schema}.t_outside (id int PRIMARY KEY)")
        outsider.execute(f"INSERT INTO {schema}.t_outside VALUES (1)")
        try:
            outsider.execute("BEGIN")
            outsider.execute(f"SELECT id FROM {schema}.t_outside WHERE id = 1 FOR UPDATE")
            release = threading.Timer(0.5, outsider.execute, ["ROLLBACK"])  # the outsider lets go on its own
            release.start()
            tr = sc.run()
            release.join()
        finally:
            outsider.execute(f"DROP TABLE IF EXISTS {schema}.t_outside")
    assert tr.sqlstate("take") is None and tr.value("take") == 1
    assert not tr.waited("take") and tr.blocked_by("take") == []
