"""Exercises of chapter 01a (the N+1 and the loader strategies), and the statement-counting judge that
chapter 01b's exercises share.

A checker never raises on a wrong answer: it returns a ``Verdict`` (shown as a green or red box
in a notebook), so the lesson notebook runs headless with the slow starters in place. The
starters live in the notebook (cells tagged ``exercise-starter``); the reference solutions live
here, and ``tests/test_exercises.py`` proves each solution passes and each untouched starter fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, joinedload, selectinload

from .. import models
from ..counting import count_queries
from .registry import exercise

User, Post = models.User, models.Post

#: parameters of the exercises, shared by checkers, starters and solutions
LISTING_SIZE = 50  # exercise 1: the newest users with their post titles
AUTHORS_SIZE = 100  # exercise 2: the newest posts with their author's name


# ----------------------------------------------------------------------------- reference solutions
def solution_fix_listing(session: Session) -> list:
    """Exercise 1: one SELECT for the users, one (batched) SELECT for all their posts."""
    stmt = select(User).order_by(User.id.desc()).limit(LISTING_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted(p.title for p in u.posts)) for u in session.scalars(stmt)]


def solution_post_authors(session: Session) -> list:
    """Exercise 2: a many-to-one joins into the same statement; its foreign key is NOT NULL, so an inner join."""
    stmt = select(Post).order_by(Post.id.desc()).limit(AUTHORS_SIZE).options(joinedload(Post.author, innerjoin=True))
    return [(p.title, p.author.name) for p in session.scalars(stmt)]


# ----------------------------------------------------------------------------- wrong answers (for the tests)
def wrong_fix_listing(session: Session) -> list:
    """Plausible but wrong: eager and in 2 statements, but the newest users were never asked for."""
    stmt = select(User).limit(LISTING_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted(p.title for p in u.posts)) for u in session.scalars(stmt)]


def wrong_post_authors(session: Session) -> list:
    """Plausible but wrong: selectin, the collections' loader, sends a second statement for the authors."""
    stmt = select(Post).order_by(Post.id.desc()).limit(AUTHORS_SIZE).options(selectinload(Post.author))
    return [(p.title, p.author.name) for p in session.scalars(stmt)]


# ----------------------------------------------------------------------------- checking
_reference_cache: dict[tuple[str, str], list] = {}


def _run(fn: Callable[[Session], list], engine: Engine):
    with Session(engine) as session, count_queries(engine) as log:
        result = fn(session)
        session.close()  # anything the result still needs to load now fails instead of sending SQL unseen
    return result, log


def reference(name: str, solution: Callable[[Session], list], engine: Engine) -> list:
    """The reference solution's result (computed once per exercise and engine URL)."""
    key = (name, engine.url.render_as_string(hide_password=True))
    if key not in _reference_cache:
        _reference_cache[key], _ = _run(solution, engine)
    return _reference_cache[key]


def statement_judge(
    name: str,
    solution: Callable[[Session], list],
    max_statements: int,
    max_rows: Callable[[list], int] | None = None,
):
    """A judge: same result as ``solution``, at most ``max_statements`` statements and ``max_rows`` rows."""

    def judge(answer: Callable[[Session], list], engine: Engine):
        expected = reference(name, solution, engine)
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


exercise(
    "01a",
    "fix_listing",
    f"Fix the N+1: the {LISTING_SIZE} newest users with their post titles",
    solution=solution_fix_listing,
    wrong=wrong_fix_listing,
    hint="add an eager loader option to the users' SELECT; which one sends a single extra statement?",
    namespace=names,
)(statement_judge("fix_listing", solution_fix_listing, 2))
exercise(
    "01a",
    "loading_post_authors",
    f"The {AUTHORS_SIZE} newest posts with their author's name, in one statement",
    solution=solution_post_authors,
    wrong=wrong_post_authors,
    hint="a many-to-one fits in the same statement: which loader joins it, and may that join be inner?",
    namespace=names,
)(statement_judge("loading_post_authors", solution_post_authors, 1))
