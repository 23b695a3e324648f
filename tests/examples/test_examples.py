"""Example tests of chapter 08: code under test commits, the fixture still leaves nothing behind.

Run them with ``pytest tests/examples -v``. The two ``functions under test`` below stand in for an
application's service layer.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from helpers import Scenario, assert_max_queries, models
from helpers.counting import TooManyQueries

from .example_factories import CommentFactory, PostFactory, ProductFactory, UserFactory


# ----------------------------------------------------------------------------- code under test
def register_user(session: Session, email: str, name: str) -> models.User:
    """A service that commits, as application code does."""
    user = models.User(email=email, name=name, region="eu", country="DE", attributes={})
    session.add(user)
    session.commit()
    return user


def feed(session: Session, *, eager: bool) -> list[tuple[str, str]]:
    """(post title, author name) of the latest posts; ``eager=False`` is the N+1 version."""
    stmt = select(models.Post).order_by(models.Post.id.desc()).limit(20)
    if eager:
        stmt = stmt.options(selectinload(models.Post.author))
    return [(p.title, p.author.name) for p in session.scalars(stmt)]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("run", ["first", "second"])
def test_commit_inside_test_leaves_nothing_behind(session, run):
    # the same fixed email both times: if the first run leaked its row, the second would hit the unique key
    register_user(session, "fixed@example.test", "Fixed")
    assert session.scalar(select(func.count()).select_from(models.User)) == 1


def test_factories_build_related_objects(session):
    comment = CommentFactory()
    assert comment.id is not None and comment.post.id is not None
    assert comment.post.author.id != comment.author.id  # two users: the post's author and the commenter
    assert session.scalar(select(func.count()).select_from(models.User)) == 2


def test_integrity_error_rolls_back_and_session_stays_usable(session):
    register_user(session, "taken@example.test", "First")
    with pytest.raises(IntegrityError):
        register_user(session, "taken@example.test", "Second")
    session.rollback()  # rolls back to the fixture's savepoint, not the outer transaction
    assert session.scalars(select(models.User.name)).all() == ["First"]


def test_savepoint_rolls_back_only_the_inner_work(session):
    UserFactory(email="outer@example.test")
    with pytest.raises(IntegrityError):
        with session.begin_nested():
            UserFactory(email="outer@example.test")  # duplicate inside a SAVEPOINT
    UserFactory(email="after@example.test")
    emails = session.scalars(select(models.User.email).order_by(models.User.email)).all()
    assert emails == ["after@example.test", "outer@example.test"]


def test_feed_has_no_n_plus_one(session, test_engine):
    PostFactory.create_batch(10)
    session.expunge_all()  # a fresh identity map, as in a new request
    with assert_max_queries(2, test_engine):
        rows = feed(session, eager=True)
    assert len(rows) == 10


def test_n_plus_one_guard_catches_lazy_loading(session, test_engine):
    PostFactory.create_batch(10)
    session.expunge_all()
    with pytest.raises(TooManyQueries, match="sent 11"):
        with assert_max_queries(2, test_engine):
            feed(session, eager=False)


def test_concurrent_update_is_detected_by_the_version_column(test_engine):
    # two connections must see each other's commits, so this test cannot use the rollback fixture:
    # it commits for real and cleans up after itself
    with Session(test_engine) as setup_s:
        product = models.Product(sku="CONC-1", name="widget", price=9.99, stock=10)
        setup_s.add(product)
        setup_s.commit()
        pid = product.id
    try:
        with Session(test_engine) as a, Session(test_engine) as b:
            pa, pb = a.get(models.Product, pid), b.get(models.Product, pid)
            pa.stock -= 1
            a.commit()  # version 1 -> 2
            pb.stock -= 1
            with pytest.raises(StaleDataError):
                b.commit()  # UPDATE ... WHERE version = 1 matches no row
        with Session(test_engine) as check:
            assert check.get(models.Product, pid).stock == 9
    finally:
        with Session(test_engine) as cleanup:
            cleanup.execute(models.Product.__table__.delete().where(models.Product.id == pid))
            cleanup.commit()


def test_product_factory_uses_the_version_column(session):
    product = ProductFactory()
    assert product.version == 1
    product.stock += 1
    session.flush()
    assert product.version == 2


def test_atomic_decrement_waits_and_loses_no_update(test_engine):
    # the session scheduler of chapters 03a, 03b and 04: two real sessions, the blocked step detected by the server
    sc = Scenario(
        name="examples_decrement",
        database=test_engine.url.database,
        setup=["INSERT INTO products (sku, name, price, stock, version) VALUES ('SCN-1', 'widget', 1, 10, 1)"],
        teardown=["DELETE FROM products WHERE sku = 'SCN-1'"],
        sessions={
            "T1": {
                "steps": {
                    "b1": "BEGIN",
                    "u1": "UPDATE products SET stock = stock - 1 WHERE sku = 'SCN-1' RETURNING stock",
                    "c1": "COMMIT",
                }
            },
            "T2": {
                "steps": {
                    "b2": "BEGIN",
                    "u2": "UPDATE products SET stock = stock - 1 WHERE sku = 'SCN-1' RETURNING stock",
                    "c2": "COMMIT",
                }
            },
        },
    )
    tr = sc.run(["b1", "b2", "u1", "u2", "c1", "c2"])
    assert tr.waited("u2") and not tr.waited("u1")
    assert (tr.value("u1"), tr.value("u2")) == (9, 8)  # T2 re-read the row after T1 committed: nothing lost


@pytest.mark.anyio
async def test_async_commit_only_releases_a_savepoint(async_session, test_engine):
    async_session.add(models.User(email="async@example.test", name="Async", region="eu", country="DE", attributes={}))
    await async_session.commit()  # RELEASE SAVEPOINT: the fixture's outer transaction stays open
    assert await async_session.scalar(select(func.count()).select_from(models.User)) == 1
    with test_engine.connect() as other:  # another connection sees nothing: the "commit" was no commit
        assert other.scalar(select(func.count()).select_from(models.User)) == 0
