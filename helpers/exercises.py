"""Exercises of the loading chapter: checkers that count statements and compare results, and reference solutions.

A checker never raises on a wrong answer: it returns a ``Verdict`` (shown as a green or red box
in a notebook), so the lesson notebook runs headless with the slow starters in place. The
starters live in the notebook (cells tagged ``exercise-starter``); the reference solutions live
here, and ``tests/test_loading.py`` proves each solution passes and each untouched starter fails.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from . import models
from .config import settings
from .counting import count_queries
from .seed import SCALES

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


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    max_statements: int
    solution: Callable[[Session], list]
    #: rows the database may send at most, as a function of the reference result (None: no limit)
    max_rows: Callable[[list], int] | None = None
    hint: str = ""


EXERCISES: dict[str, Exercise] = {
    "fix_listing": Exercise(
        "fix_listing",
        f"Fix the N+1: the {LISTING_SIZE} newest users with their post titles",
        2,
        solution_fix_listing,
        hint="add an eager loader option to the users' SELECT; which one sends a single extra statement?",
    ),
    "nested_page": Exercise(
        "nested_page",
        f"A nested page: {NESTED_SIZE} users -> posts -> comment counts in at most 3 statements",
        3,
        solution_nested_page,
        hint="loader options chain along a path: User.posts, then Post.comments.",
    ),
    "no_cartesian": Exercise(
        "no_cartesian",
        f"Users {PAGE[0]}-{PAGE[1]} with posts and orders, no cartesian explosion",
        3,
        solution_no_cartesian,
        max_rows=lambda ref: len(ref) + sum(len(r[1]) + len(r[2]) for r in ref),
        hint="two collections joined at once multiply: rows = posts x orders per user.",
    ),
}


# ----------------------------------------------------------------------------- checking
@dataclass
class Verdict:
    """What a checker found: statements and rows sent, whether the result matches the reference."""

    exercise: str
    title: str
    passed: bool
    statements: int
    max_statements: int
    rows: int
    max_rows: int | None
    same_result: bool
    message: str

    def __repr__(self) -> str:
        mark = "PASS" if self.passed else "NOT YET"
        return f"[{mark}] {self.title}: {self.message}"

    def _repr_html_(self) -> str:
        colour, mark = ("#e6f4ea", "✅ passed") if self.passed else ("#fdecea", "❌ not yet")
        return (
            f'<div style="background:{colour};padding:8px;border-radius:4px">'
            f"<b>{mark}</b> — {html.escape(self.title)}<br>{html.escape(self.message)}</div>"
        )


_reference_cache: dict[tuple[str, str], list] = {}


def _run(fn: Callable[[Session], list], engine: Engine):
    with Session(engine) as session, count_queries(engine) as log:
        result = fn(session)
        session.close()  # anything the result still needs to load now fails instead of sending SQL unseen
    return result, log


def reference(name: str, engine: Engine | None = None) -> list:
    """The reference solution's result (computed once per engine URL)."""
    from .database import get_engine

    engine = engine or get_engine()
    key = (name, engine.url.render_as_string(hide_password=True))
    if key not in _reference_cache:
        _reference_cache[key], _ = _run(EXERCISES[name].solution, engine)
    return _reference_cache[key]


def check(name: str, fn: Callable[[Session], list], engine: Engine | None = None) -> Verdict:
    """Run ``fn(session)`` in a fresh Session, count its statements and rows, compare with the reference."""
    from .database import get_engine

    engine = engine or get_engine()
    ex = EXERCISES[name]
    expected = reference(name, engine)
    try:
        result, log = _run(fn, engine)
        error = None
    except Exception as exc:  # noqa: BLE001 - a verdict, never a traceback, in the lesson notebook
        result, log, error = None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if error:
        return Verdict(name, ex.title, False, 0, ex.max_statements, 0, None, False, f"the function raised {error}")
    statements = log.count
    rows = int(sum(max(s.rows, 0) for s in log.statements))
    max_rows = ex.max_rows(expected) if ex.max_rows else None
    same = result == expected
    problems = []
    if not same:
        problems.append("the result differs from the expected one")
    if statements > ex.max_statements:
        problems.append(f"{statements} statements sent, at most {ex.max_statements} allowed")
    if max_rows is not None and rows > max_rows:
        problems.append(f"{rows:,} rows fetched for {max_rows:,} objects: rows are being multiplied")
    passed = not problems
    if passed:
        message = f"{statements} statement(s), {rows:,} rows, same result as the reference."
    else:
        message = "; ".join(problems) + "." + (f" Hint: {ex.hint}" if ex.hint else "")
    return Verdict(name, ex.title, passed, statements, ex.max_statements, rows, max_rows, same, message)


def names() -> dict:
    """The names a starter cell may use (what the notebook imported): models and loader options."""
    import sqlalchemy
    import sqlalchemy.orm as orm

    ns = {n: getattr(models, n) for n in ("User", "Post", "Comment", "Order", "Tag", "Profile")}
    ns["exercises"] = sys.modules[__name__]
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
