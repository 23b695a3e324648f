"""helpers.locks against the real server: views of pg_locks / pg_blocking_pids and measured conflicts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from helpers import lab_schema, psycopg_conninfo, setup
from helpers.locks import (
    MODES,
    ROW_LOCK_MODES,
    blocking,
    lock_sql,
    locks,
    locks_taken,
    row_conflicts,
    strongest,
    table_conflicts,
)

# PostgreSQL documentation, "Conflicting Lock Modes" (table 13.2), rows requested, columns held (MODES order)
DOC_TABLE = [
    "00000001",
    "00000011",
    "00001111",
    "00011111",
    "00110111",
    "00111111",
    "01111111",
    "11111111",
]
# "Conflicting Row-Level Locks" (table 13.3)
DOC_ROW = ["0001", "0011", "0111", "1111"]


@pytest.fixture(scope="module")
def engine():
    return setup(quiet=True)


@pytest.fixture(scope="module")
def schema(engine):
    return lab_schema(engine, "locking")


def test_mode_lists_and_strongest():
    assert MODES[0] == "AccessShareLock" and MODES[-1] == "AccessExclusiveLock" and len(set(MODES)) == 8
    assert ROW_LOCK_MODES == ["FOR KEY SHARE", "FOR SHARE", "FOR NO KEY UPDATE", "FOR UPDATE"]
    assert strongest(["RowShareLock", "ShareLock", "AccessShareLock"]) == "ShareLock"
    assert strongest(["ExclusiveLock", "AccessExclusiveLock"]) == "AccessExclusiveLock"
    assert strongest([]) is None and strongest(["SIReadLock"]) is None
    assert lock_sql("ShareUpdateExclusiveLock") == "SHARE UPDATE EXCLUSIVE"


def test_locks_and_blocking_show_holder_and_waiter(engine, schema):
    t = f"{schema}.t_view"
    info = psycopg_conninfo()
    with (
        psycopg.connect(**info, autocommit=True, application_name="wb_testlocks_holder") as holder,
        psycopg.connect(**info, autocommit=True, application_name="wb_testlocks_waiter") as waiter,
    ):
        holder.execute(f"DROP TABLE IF EXISTS {t}")
        holder.execute(f"CREATE TABLE {t} (id int)")
        holder.execute("BEGIN")
        holder.execute(f"LOCK TABLE {t} IN SHARE MODE")
        waiter.execute("SELECT set_config('lock_timeout', %s, false)", ("5s",))
        hp, wp = holder.info.backend_pid, waiter.info.backend_pid
        waiter.execute("BEGIN")
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(waiter.execute, f"LOCK TABLE {t} IN ROW EXCLUSIVE MODE")
            try:
                for _ in range(2000):  # until the server shows the waiter blocked (lock_timeout bounds it)
                    b = blocking(engine, "wb_testlocks_%").set_index("pid")
                    if wp in b.index and b.loc[wp, "blocked_by"]:
                        break
                assert b.loc[wp, "blocked_by"] == [hp] and b.loc[hp, "blocked_by"] == []
                assert b.loc[wp, "wait_event_type"] == "Lock"
                assert {hp, wp} <= set(blocking(engine)["pid"])
                df = locks(engine, relation=t)
                held = df[df.pid == hp].iloc[0]
                want = df[df.pid == wp].iloc[0]
                assert (held["mode"], bool(held["granted"])) == ("ShareLock", True)
                assert (want["mode"], bool(want["granted"])) == ("RowExclusiveLock", False)
                assert want["waitstart"] is not None and held["relation"] == t
                assert set(locks(engine, pids=[hp])["pid"]) == {hp}
            finally:
                holder.execute("ROLLBACK")
            fut.result()
        waiter.execute("ROLLBACK")
        holder.execute(f"DROP TABLE {t}")


def test_measured_table_conflicts_match_the_documentation(schema):
    m = table_conflicts(schema)
    assert list(m.index) == MODES and list(m.columns) == MODES
    assert ["".join("1" if v else "0" for v in m.loc[r]) for r in MODES] == DOC_TABLE
    assert (m.values == m.values.T).all()


def test_measured_row_conflicts_match_the_documentation(schema):
    m = row_conflicts(schema)
    assert ["".join("1" if v else "0" for v in m.loc[r]) for r in ROW_LOCK_MODES] == DOC_ROW


def test_locks_taken_by_ordinary_statements(schema):
    t = f"{schema}.t_taken"
    df = locks_taken(
        {"select": f"SELECT * FROM {t}", "update": f"UPDATE {t} SET v = 1", "truncate": f"TRUNCATE {t}"},
        setup=[f"DROP TABLE IF EXISTS {t}", f"CREATE TABLE {t} (id int PRIMARY KEY, v int)"],
        schema=schema,
    )
    on_table = df[df.relation == "t_taken"].groupby("statement")["mode"].agg(strongest)
    assert on_table.to_dict() == {
        "select": "AccessShareLock",
        "update": "RowExclusiveLock",
        "truncate": "AccessExclusiveLock",
    }
