"""helpers.retry on real serialization failures, and anomaly verdicts that are exact properties of PostgreSQL."""

from __future__ import annotations

import random

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from helpers import anomalies, lab_schema, make_engine, psycopg_conninfo, retry, setup

TABLE = "counter"


@pytest.fixture(scope="module")
def schema():
    engine = setup(quiet=True)
    return lab_schema(engine, "isolation_tests")  # not wb_isolation: the notebook may run at the same time


@pytest.fixture()
def rr(schema):
    """A repeatable-read engine and a fresh one-row counter table."""
    eng = make_engine(
        isolation_level="REPEATABLE READ", poolclass=NullPool, connect_args={"application_name": "wb_isolation_tests"}
    )
    with eng.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {schema}.{TABLE}"))
        conn.execute(text(f"CREATE TABLE {schema}.{TABLE} (id int PRIMARY KEY, n int NOT NULL)"))
        conn.execute(text(f"INSERT INTO {schema}.{TABLE} VALUES (1, 0)"))
    yield eng, f"{schema}.{TABLE}"
    with eng.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {schema}.{TABLE}"))
    eng.dispose()


def _increment(eng, table, interfere):
    """Read n, let another connection commit an increment meanwhile (if asked), write n + 1."""
    with eng.begin() as conn:
        conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": "3s"})
        n = conn.execute(text(f"SELECT n FROM {table} WHERE id = 1")).scalar_one()
        if interfere():
            with psycopg.connect(**psycopg_conninfo(), autocommit=True) as other:
                other.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
        conn.execute(text(f"UPDATE {table} SET n = :n WHERE id = 1"), {"n": n + 1})
    return n + 1


def _value(eng, table):
    with eng.connect() as conn:
        return conn.execute(text(f"SELECT n FROM {table} WHERE id = 1")).scalar_one()


def test_retry_recovers_from_a_real_serialization_failure(rr):
    eng, table = rr
    calls, retried, slept = [], [], []
    first_only = iter([True])

    def interfere():
        return next(first_only, False)

    def work():
        calls.append(1)
        return _increment(eng, table, interfere)

    result = retry(
        work,
        attempts=3,
        rng=random.Random(0),
        sleep=slept.append,
        on_retry=lambda attempt, exc, delay: retried.append((attempt, exc.orig.sqlstate, delay)),
    )()
    assert len(calls) == 2
    assert [(a, s) for a, s, _ in retried] == [(1, "40001")]
    assert slept == [retried[0][2]] and 0 <= slept[0] <= 0.005
    assert result == 2 and _value(eng, table) == 2  # the other increment and ours: nothing lost


def test_retry_gives_up_after_the_bounded_attempts(rr):
    eng, table = rr
    calls, slept = [], []

    @retry(attempts=4, base=0.01, cap=0.03, rng=random.Random(1), sleep=slept.append)
    def always_conflicting():
        calls.append(1)
        return _increment(eng, table, lambda: True)

    with pytest.raises(DBAPIError) as info:
        always_conflicting()
    assert info.value.orig.sqlstate == "40001"
    assert len(calls) == 4 and len(slept) == 3
    assert all(0 <= d <= min(0.03, 0.01 * 2**i) for i, d in enumerate(slept))
    assert any("gave up after 4 attempts" in note for note in getattr(info.value, "__notes__", []))
    assert _value(eng, table) == 4  # only the interfering increments committed


def test_retry_raises_other_errors_at_once(rr):
    eng, table = rr
    calls = []

    @retry(attempts=5)
    def not_null():
        calls.append(1)
        with eng.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES (2, NULL)"))

    with pytest.raises(DBAPIError) as info:
        not_null()
    assert info.value.orig.sqlstate == "23502" and len(calls) == 1


def test_retry_retries_a_taken_key_then_gives_up_with_a_note(rr):
    """23505 is retried (PostgreSQL docs 13.5: it may be a serialization failure in disguise); a key that
    stays taken fails the same way each time and is raised after the attempts, saying how many."""
    eng, table = rr
    calls = []

    @retry(attempts=3, sleep=lambda d: None)
    def duplicate():
        calls.append(1)
        with eng.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES (1, 0)"))

    with pytest.raises(DBAPIError) as info:
        duplicate()
    assert info.value.orig.sqlstate == "23505" and len(calls) == 3
    assert any("gave up after 3 attempts" in n for n in info.value.__notes__)


def test_retry_treats_deadlock_as_retryable():
    attempts = []

    @retry(attempts=2, sleep=lambda d: None)
    def victim():
        attempts.append(1)
        if len(attempts) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return "ok"

    assert victim() == "ok" and len(attempts) == 2


# The tests' own copies of four of chapter 04's scripts (the chapter's cells hold the lesson's).
G2_ITEM = anomalies.Anomaly(
    "G2-item",
    """
    T1: BEGIN
    T2: BEGIN
    T1: SELECT id, value FROM {t} WHERE id IN (1, 2) ORDER BY id   -- r1
    T2: SELECT id, value FROM {t} WHERE id IN (1, 2) ORDER BY id   -- r2
    T1: UPDATE {t} SET value = 11 WHERE id = 1
    T2: UPDATE {t} SET value = 21 WHERE id = 2
    T1: COMMIT   -- c1
    T2: COMMIT   -- c2
    """,
)
P4 = anomalies.Anomaly(
    "P4",
    """
    T1: BEGIN
    T2: BEGIN
    T1: SELECT id, value FROM {t} WHERE id = 1   -- r1
    T2: SELECT id, value FROM {t} WHERE id = 1   -- r2
    T1: UPDATE {t} SET value = 11 WHERE id = 1   -- w1
    T2: UPDATE {t} SET value = 11 WHERE id = 1   -- w2
    T1: COMMIT
    T2: COMMIT
    """,
)
DIRTY_READ = anomalies.Anomaly(
    "dirty_read",
    """
    T1: BEGIN
    T2: BEGIN
    T1: UPDATE {t} SET value = 101 WHERE id = 1
    T2: SELECT id, value FROM {t} WHERE id = 1   -- r2
    T1: ROLLBACK
    T2: COMMIT
    """,
)
PHANTOM = anomalies.Anomaly(
    "phantom_read",
    """
    T1: BEGIN
    T2: BEGIN
    T1: SELECT id, value FROM {t} WHERE value > 15 ORDER BY id   -- r1a
    T2: INSERT INTO {t} (id, value) VALUES (3, 30)
    T2: COMMIT
    T1: SELECT id, value FROM {t} WHERE value > 15 ORDER BY id   -- r1b
    T1: COMMIT
    """,
)


def test_write_skew_occurs_under_repeatable_read_and_is_prevented_under_serializable(schema):
    rr = anomalies.run(G2_ITEM, "repeatable read", schema)
    ser = anomalies.run(G2_ITEM, "serializable", schema)
    assert rr.outcome == "occurred" and rr.transcript.rows("final") == [(1, 11), (2, 21)]
    assert ser.outcome == "prevented" and ser.how == "serialization failure"
    assert ser.transcript.sqlstate("c2") == "40001" and ser.transcript.rows("final") == [(1, 11), (2, 20)]


def test_lost_update_occurs_under_read_committed_and_fails_under_repeatable_read(schema):
    rc = anomalies.run(P4, "read committed", schema)
    rr = anomalies.run(P4, "repeatable read", schema)
    assert rc.outcome == "occurred" and rc.transcript.waited("w2") and rc.transcript.sqlstate("w2") is None
    assert rr.outcome == "prevented" and rr.how == "blocked, then serialization failure"
    assert rr.transcript.blocked_by("w2") == ["T1"] and rr.transcript.sqlstate("w2") == "40001"


def test_read_uncommitted_reads_no_dirty_data_and_repeatable_read_no_phantoms(schema):
    dirty = anomalies.run(DIRTY_READ, "read uncommitted", schema)
    phantom = anomalies.run(PHANTOM, "repeatable read", schema)
    phantom_rc = anomalies.run(PHANTOM, "read committed", schema)
    assert (
        dirty.anomaly.key == "dirty_read" and dirty.outcome == "prevented" and dirty.transcript.rows("r2") == [(1, 10)]
    )
    assert phantom.anomaly.key == "phantom_read" and phantom.outcome == "prevented"
    assert phantom_rc.outcome == "occurred" and phantom_rc.transcript.rows("r1b") == [(2, 20), (3, 30)]


def test_prevented_by_labels_how_and_retryable_says_what_to_retry():
    from helpers import retrying

    assert anomalies.PREVENTED_BY == {"40001": "serialization failure", "40P01": "deadlock"}
    assert not hasattr(anomalies, "RETRYABLE") and not hasattr(anomalies, "LEVELS")
    assert {"40001", "40P01", "23505", "23P01"} <= retrying.RETRYABLE


def test_an_unknown_anomaly_needs_its_own_decision():
    with pytest.raises(KeyError, match="no decision"):
        anomalies.Anomaly("G9", "T1: SELECT 1")


def test_retry_also_retries_the_exception_types_it_is_given():
    class Conflict(Exception):
        pass

    calls = []

    @retry(attempts=3, also=(Conflict,), sleep=lambda d: None)
    def optimistic():
        calls.append(1)
        if len(calls) < 3:
            raise Conflict("the version changed")
        return "saved"

    assert optimistic() == "saved" and len(calls) == 3
    with pytest.raises(ValueError):
        retry(lambda: (_ for _ in ()).throw(ValueError("not retried")), attempts=3, also=(Conflict,))()
