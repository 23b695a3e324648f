"""Exercises of chapter 01b (several collections, nested pages): statement and row counts, judged by
``ch01a.statement_judge``; and the page of users whose counts do not grow with the scale (``PAGE``),
which the chapter's cartesian section uses too.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, selectinload

from .. import models
from ..config import SCALES, settings
from .ch01a import names, statement_judge
from .registry import exercise

User, Post = models.User, models.Post

NESTED_SIZE = 20  # exercise 1: the newest users, their posts, each post's comment count


def page_for(scale: str) -> tuple[int, int]:
    """Exercise 2's 20 users (and chapter 01b's cartesian pages): ids whose users own about as many posts and
    orders at every scale.

    The seed gives user k about ``posts / (2 * sqrt(k * users))`` posts (orders likewise), so the first users
    own more and more as the scale grows: at ``large`` users 21-40 joined twice are about 1.7 million rows and
    2 GB of post bodies. Starting at ``21 * (posts / posts at ci) ** 2 / (users / users at ci)`` keeps each
    user's counts those of ids 21-40 at ``ci``: ids 21-40 at ``ci``, 210-229 at ``small``, 2,100-2,119 at ``large``.
    """
    s, ci = SCALES[scale], SCALES["ci"]
    start = round(21 * (s.posts / ci.posts) ** 2 / (s.users / ci.users))
    return start, start + 19


PAGE = page_for(settings().scale)  # exercise 2: users with ids in this range, with posts and orders


# ----------------------------------------------------------------------------- reference solutions
def solution_nested_page(session: Session) -> list:
    """Exercise 1: users -> posts -> comments in three statements with chained selectinload."""
    stmt = (
        select(User)
        .order_by(User.id.desc())
        .limit(NESTED_SIZE)
        .options(selectinload(User.posts).selectinload(Post.comments))
    )
    return [(u.name, sorted((p.title, len(p.comments)) for p in u.posts)) for u in session.scalars(stmt)]


def solution_no_cartesian(session: Session) -> list:
    """Exercise 2: two collections, each loaded by its own selectin query: no row multiplication."""
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
def wrong_nested_page(session: Session) -> list:
    """Plausible but wrong: only the first level is eager, so each post's comments load one by one."""
    stmt = select(User).order_by(User.id.desc()).limit(NESTED_SIZE).options(selectinload(User.posts))
    return [(u.name, sorted((p.title, len(p.comments)) for p in u.posts)) for u in session.scalars(stmt)]


def wrong_no_cartesian(session: Session) -> list:
    """Plausible but wrong: both collections joined at once multiply the rows."""
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


exercise(
    "01b",
    "nested_page",
    f"A nested page: {NESTED_SIZE} users -> posts -> comment counts in at most 3 statements",
    solution=solution_nested_page,
    wrong=wrong_nested_page,
    hint="loader options chain along a path: User.posts, then Post.comments.",
    namespace=names,
)(statement_judge("nested_page", solution_nested_page, 3))
exercise(
    "01b",
    "no_cartesian",
    f"Users {PAGE[0]}-{PAGE[1]} with posts and orders, no cartesian explosion",
    solution=solution_no_cartesian,
    wrong=wrong_no_cartesian,
    hint="two collections joined at once multiply: rows = posts x orders per user.",
    namespace=names,
)(
    statement_judge(
        "no_cartesian",
        solution_no_cartesian,
        3,
        max_rows=lambda ref: len(ref) + sum(len(r[1]) + len(r[2]) for r in ref),
    )
)
