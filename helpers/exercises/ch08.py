"""Exercises of chapter 08 (testing strategies): a fixture that isolates a committing test, and an N+1 guard.

Both judges measure what does not vary between runs: rows left on the server after a test, the
errors a test body saw, statement counts. The fixture judge writes only into a scratch schema of
this kernel's own (``lab_schema``), dropped in a ``finally``; the guard judge only reads.
"""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import Column, Engine, Integer, MetaData, Table, Text, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from .. import models
from ..counting import TooManyQueries, assert_max_queries, count_queries
from .registry import exercise

FEED_SIZE = 20  # exercise 2: the newest published posts with their authors' names


# ----------------------------------------------------------------------------- exercise 1: the fixture
def _items(schema: str) -> Table:
    return Table(
        "items",
        MetaData(schema=schema),
        Column("id", Integer, primary_key=True),
        Column("note", Text, nullable=False, unique=True),
    )


def _test_body(session: Session, items: Table) -> dict:
    """The test the fixture must isolate: it commits, hits a unique key, rolls back, and commits again."""
    session.execute(insert(items).values(note="first"))
    session.commit()  # application code commits
    try:
        session.execute(insert(items).values(note="first"))
        duplicate = None
    except IntegrityError as exc:
        duplicate = type(exc.orig).__name__
    session.rollback()  # as application code does after an IntegrityError
    kept = session.scalars(select(items.c.note).order_by(items.c.note)).all()
    session.execute(insert(items).values(note="second"))
    session.commit()
    return {"duplicate": duplicate, "visible_after_rollback": list(kept)}


def judge_isolating_fixture(answer, engine: Engine):
    from .. import drop_lab_schema, lab_schema

    schema = lab_schema(engine, "ex08_fixture")
    try:
        items = _items(schema)
        items.drop(engine, checkfirst=True)
        items.create(engine)
        runs = []
        for run in ("first", "second"):
            try:
                with answer(engine) as session:
                    outcome = _test_body(session, items)
            except Exception as exc:  # noqa: BLE001 - the test failed: that is the measurement
                outcome = {"error": type(getattr(exc, "orig", None) or exc).__name__}
            with engine.connect() as conn:
                outcome["rows_left"] = conn.scalar(select(func.count()).select_from(items))
            runs.append({"run": run, **outcome})
    finally:
        drop_lab_schema(engine, schema)
    measured = {"runs": runs}
    expected = {"duplicate": "UniqueViolation", "visible_after_rollback": ["first"], "rows_left": 0}
    for r in runs:
        if "error" in r:
            return (
                False,
                f"the {r['run']} run of the test failed with {r['error']}; rows left: {r['rows_left']}",
                measured,
            )
        if r["rows_left"]:
            return False, f"after the {r['run']} run, {r['rows_left']} row(s) stayed in the database", measured
        if r != {"run": r["run"], **expected}:
            return (
                False,
                f"in the {r['run']} run, after the rollback the test saw {r['visible_after_rollback']} "
                "instead of ['first']: the rollback undid the test's earlier committed work",
                measured,
            )
    return True, "both runs passed, the test's commits stayed inside the fixture, and no row was left.", measured


@contextmanager
def solution_isolating_fixture(engine):
    """One connection, an outer transaction, the Session inside a SAVEPOINT; rolled back at the end."""
    with engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            yield session
        outer.rollback()


@contextmanager
def wrong_isolating_fixture(engine):
    """Plausible but wrong: the 1.x recipe, without ``join_transaction_mode`` (2.x: "conservative_savepoint")."""
    with engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn) as session:
            yield session
        if outer.is_active:
            outer.rollback()


exercise(
    "08",
    "testing_isolating_fixture",
    "A fixture that isolates a test which commits",
    solution=solution_isolating_fixture,
    wrong=wrong_isolating_fixture,
    hint=(
        "bind the Session to one connection inside an outer transaction with "
        "join_transaction_mode='create_savepoint', so commit() and rollback() act on a SAVEPOINT "
        "and the fixture rolls the outer transaction back"
    ),
    namespace=lambda: names(),
)(judge_isolating_fixture)


# ----------------------------------------------------------------------------- exercise 2: the N+1 guard
def _feed(engine: Engine, *, eager: bool):
    def feed() -> list:
        stmt = select(models.Post).where(models.Post.published).order_by(models.Post.id.desc()).limit(FEED_SIZE)
        if eager:
            stmt = stmt.options(selectinload(models.Post.author))
        with Session(engine) as session:
            return [(p.title, p.author.name) for p in session.scalars(stmt)]

    return feed


def judge_n_plus_one_guard(answer, engine: Engine):
    outcomes, sent = {}, {}
    for name, eager in (("eager", True), ("lazy", False)):
        feed = _feed(engine, eager=eager)
        with count_queries(engine) as log:
            feed()
        sent[name] = log.count
        try:
            answer(feed, engine)
            outcomes[name] = "passed"
        except TooManyQueries:
            outcomes[name] = "failed: TooManyQueries"
        except Exception as exc:  # noqa: BLE001 - the learner's test failed some other way
            outcomes[name] = f"failed: {type(exc).__name__}"
    measured = {"statements_sent": sent, "test_outcome": outcomes}
    if sent["lazy"] <= sent["eager"]:
        return False, f"the lazy feed sent only {sent['lazy']} statements here: nothing to catch", measured
    if outcomes["eager"] != "passed":
        return False, f"your test fails the good feed ({sent['eager']} statements): {outcomes['eager']}", measured
    if outcomes["lazy"] != "failed: TooManyQueries":
        return (
            False,
            f"the N+1 feed ({sent['lazy']} statements) {outcomes['lazy']} your test: it was not caught",
            measured,
        )
    return (
        True,
        f"your test passes the {sent['eager']}-statement feed and catches the {sent['lazy']}-statement N+1.",
        measured,
    )


def solution_n_plus_one_guard(feed, engine):
    """The good feed sends 2 statements (posts, then their authors in one IN): allow exactly that."""
    with assert_max_queries(2, engine):
        rows = feed()
    assert len(rows) == FEED_SIZE


def wrong_n_plus_one_guard(feed, engine):
    """Plausible but wrong: a generous bound (25) that the N+1 (1 + authors <= 21 statements) never reaches."""
    with assert_max_queries(25, engine):
        rows = feed()
    assert len(rows) == FEED_SIZE


exercise(
    "08",
    "testing_n_plus_one_guard",
    f"A test that catches an N+1 in the feed of the {FEED_SIZE} newest posts",
    solution=solution_n_plus_one_guard,
    wrong=wrong_n_plus_one_guard,
    hint=(
        "wrap the call in assert_max_queries(n, engine) with n the number of statements the eager "
        "feed sends (count them with count_queries): a bound above 1 + authors lets the N+1 through"
    ),
    namespace=lambda: names(),
)(judge_n_plus_one_guard)


def names() -> dict:
    """The names a starter cell may use (what chapter 08 imported)."""
    import sys

    return {
        "contextmanager": contextmanager,
        "Session": Session,
        "select": select,
        "func": func,
        "selectinload": selectinload,
        "models": models,
        "assert_max_queries": assert_max_queries,
        "count_queries": count_queries,
        "TooManyQueries": TooManyQueries,
        "exercises": sys.modules[__package__],
        "FEED_SIZE": FEED_SIZE,
    }
