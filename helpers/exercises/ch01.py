"""Exercises of chapter 01 (loading): checkers that count statements and compare results, and reference solutions.

A checker never raises on a wrong answer: it returns a ``Verdict`` (shown as a green or red box
in a notebook), so the lesson notebook runs headless with the slow starters in place. The
starters live in the notebook (cells tagged ``exercise-starter``); the reference solutions live
here, and ``tests/test_loading.py`` proves each solution passes and each untouched starter fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from .. import models
from ..config import settings
from ..counting import count_queries
from ..seed import SCALES
from . import exercise

User, Post, Order = models.User, models.Post, models.Order

#: parameters of the exercises, shared by checkers, starters and solutions
LISTING_SIZE = 50  # exercise 1: the newest users with their post titles
NESTED_SIZE = 20  # exercise 2: the newest users, their posts, each post's comment count


def page_for(scale: str) -> tuple[int, int]:
    """Exercise 3's 20 users (and chapter 01's cartesian pages): ids whose users own about as many posts and
    orders at every scale.

    The seed gives user k about ``posts / (2 * sqrt(k * users))`` posts (orders likewise), so the first users
    own more and more as the scale grows: at ``large`` users 21-40 joined twice are about 1.7 million rows and
    2 GB of post bodies. Starting at ``21 * (posts / posts at ci) ** 2 / (users / users at ci)`` keeps each
    user's counts those of ids 21-40 at ``ci``: ids 21-40 at ``ci``, 210-229 at ``small``, 2,100-2,119 at ``large``.
    """
    s, ci = SCALES[scale], SCALES["ci"]
    start = round(21 * (s.posts / ci.posts) ** 2 / (s.users / ci.users))
    return start, start + 19


PAGE = page_for(settings().scale)  # exercise 3: users with ids in this range, with posts and orders


# ----------------------------------------------------------------------------- reference solutions
def solution_fix_listing(session: Session) -> list:
    """Exercise 1: one SELECT for the users, one (batched) SELECT for all their posts."""
    stmt = select(User).order_by(User.id.desc()).limit(LISTING_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted(p.title for p in u.posts)) for u in session.scalars(stmt)]


def solution_nested_page(session: Session) -> list:
    """Exercise 2: users -> posts -> comments in three statements with chained selectinload."""
    stmt = (
        select(User)
        .order_by(User.id.desc())
        .limit(NESTED_SIZE)
        .options(selectinload(User.posts).selectinload(Post.comments))
    )
    return [(u.name, sorted((p.title, len(p.comments)) for p in u.posts)) for u in session.scalars(stmt)]


def solution_no_cartesian(session: Session) -> list:
    """Exercise 3: two collections, each loaded by its own selectin query: no row multiplication."""
    stmt = (
        select(User)
        .where(User.id.between(*PAGE))
        .order_by(User.id)
        .options(selectinload(User.posts), selectinload(User.orders))
    )
    return [
        (u.name, sorted(p.title for p in u.posts), sorted(o.total for o in u.orders)) for u in session.scalars(stmt)
    ]


# ----------------------------------------------------------------------------- wrong answers (for the tests)
def wrong_fix_listing(session: Session) -> list:
    """Plausible but wrong: eager and in 2 statements, but the newest users were never asked for."""
    stmt = select(User).limit(LISTING_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted(p.title for p in u.posts)) for u in session.scalars(stmt)]


def wrong_nested_page(session: Session) -> list:
    """Plausible but wrong: only the first level is eager, so each post's comments load one by one."""
    stmt = select(User).order_by(User.id.desc()).limit(NESTED_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted((p.title, len(p.comments)) for p in u.posts)) for u in session.scalars(stmt)]


def wrong_no_cartesian(session: Session) -> list:
    """Plausible but wrong: both collections joined at once multiply the rows."""
    from sqlalchemy.orm import joinedload

    stmt = (
        select(User)
        .where(User.id.between(*PAGE))
        .order_by(User.id)
        .options(joinedload(User.posts), joinedload(User.orders))
    )
    return [
        (u.name, sorted(p.title for p in u.posts), sorted(o.total for o in u.orders))
        for u in session.scalars(stmt).unique()
    ]


# ----------------------------------------------------------------------------- checking
_reference_cache: dict[tuple[str, str], list] = {}


def _run(fn: Callable[[Session], list], engine: Engine):
    with Session(engine) as session, count_queries(engine) as log:
        result = fn(session)
        session.close()  # anything the result still needs to load now fails instead of sending SQL unseen
    return result, log


def reference(name: str, engine: Engine) -> list:
    """The reference solution's result (computed once per engine URL)."""
    key = (name, engine.url.render_as_string(hide_password=True))
    if key not in _reference_cache:
        _reference_cache[key], _ = _run(_SOLUTIONS[name], engine)
    return _reference_cache[key]


def _judge(name: str, max_statements: int, max_rows: Callable[[list], int] | None = None):
    """A judge: same result as the reference, at most ``max_statements`` statements and ``max_rows`` rows."""

    def judge(answer: Callable[[Session], list], engine: Engine):
        expected = reference(name, engine)
        result, log = _run(answer, engine)
        statements = log.count
        rows = int(sum(max(s.rows, 0) for s in log.statements))
        limit = max_rows(expected) if max_rows else None
        same = result == expected
        measured = {
            "statements": statements,
            "max_statements": max_statements,
            "rows": rows,
            "max_rows": limit,
            "same_result": same,
        }
        problems = []
        if not same:
            problems.append("the result differs from the expected one")
        if statements > max_statements:
            problems.append(f"{statements} statements sent, at most {max_statements} allowed")
        if limit is not None and rows > limit:
            problems.append(f"{rows:,} rows fetched for {limit:,} objects: rows are being multiplied")
        if problems:
            return False, "; ".join(problems) + ".", measured
        return True, f"{statements} statement(s), {rows:,} rows, same result as the reference.", measured

    return judge


_SOLUTIONS = {
    "fix_listing": solution_fix_listing,
    "nested_page": solution_nested_page,
    "no_cartesian": solution_no_cartesian,
}

exercise(
    "01",
    "fix_listing",
    f"Fix the N+1: the {LISTING_SIZE} newest users with their post titles",
    solution=solution_fix_listing,
    wrong=wrong_fix_listing,
    hint="add an eager loader option to the users' SELECT; which one sends a single extra statement?",
    namespace=lambda: names(),
)(_judge("fix_listing", 2))
exercise(
    "01",
    "nested_page",
    f"A nested page: {NESTED_SIZE} users -> posts -> comment counts in at most 3 statements",
    solution=solution_nested_page,
    wrong=wrong_nested_page,
    hint="loader options chain along a path: User.posts, then Post.comments.",
    namespace=lambda: names(),
)(_judge("nested_page", 3))
exercise(
    "01",
    "no_cartesian",
    f"Users {PAGE[0]}-{PAGE[1]} with posts and orders, no cartesian explosion",
    solution=solution_no_cartesian,
    wrong=wrong_no_cartesian,
    hint="two collections joined at once multiply: rows = posts x orders per user.",
    namespace=lambda: names(),
)(
    _judge(
        "no_cartesian",
        3,
        max_rows=lambda ref: len(ref) + sum(len(r[1]) + len(r[2]) for r in ref),
    )
)


def names() -> dict:
    """The names a starter cell may use (what the notebook imported): models and loader options."""
    import sqlalchemy
    import sqlalchemy.orm as orm

    ns = {n: getattr(models, n) for n in ("User", "Post", "Comment", "Order", "Tag", "Profile")}
    ns["exercises"] = sys.modules[__package__]
    ns.update({n: getattr(sqlalchemy, n) for n in ("select", "func", "text")})
    ns.update(
        {
            n: getattr(orm, n)
            for n in (
                "Session",
                "selectinload",
                "joinedload",
                "subqueryload",
                "lazyload",
                "immediateload",
                "raiseload",
                "load_only",
                "defer",
                "contains_eager",
            )
        }
    )
    return ns
