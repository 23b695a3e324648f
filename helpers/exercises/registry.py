"""The exercises' registry, their verdicts and the trainer's reveal (see ``helpers/exercises/__init__.py``)."""

from __future__ import annotations

import html
import importlib
import inspect
import pkgutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine


@dataclass
class Verdict:
    """What a checker found: passed or not, a message (with the hint when not), and what it measured."""

    exercise: str
    title: str
    passed: bool
    message: str
    measured: dict = field(default_factory=dict)

    def __getattr__(self, name: str):  # verdict.statements, verdict.rows, ... : what the checker measured
        measured = self.__dict__.get("measured", {})
        if name in measured:
            return measured[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        mark = "PASS" if self.passed else "NOT YET"
        return f"[{mark}] {self.title}: {self.message}"

    def _repr_html_(self) -> str:
        colour, mark = ("#e6f4ea", "✅ passed") if self.passed else ("#fdecea", "❌ not yet")
        return (
            f'<div style="background:{colour};padding:8px;border-radius:4px">'
            f"<b>{mark}</b> — {html.escape(self.title)}<br>{html.escape(self.message)}</div>"
        )


Judge = Callable[[Any, Engine], "tuple[bool, str, dict]"]


@dataclass(frozen=True)
class Exercise:
    chapter: str  # the notebook's number, e.g. "02"
    name: str  # unique over the workbook; the starter cell's tag
    title: str
    judge: Judge
    solution: Callable
    wrong: Callable  # a plausible wrong answer: the tests prove it fails, with the hint
    hint: str
    #: names a starter cell uses besides builtins (the tests exec the notebook's starter with them)
    namespace: Callable[[], dict] | None = None


EXERCISES: dict[str, Exercise] = {}


def exercise(
    chapter: str,
    name: str,
    title: str,
    *,
    solution: Callable,
    wrong: Callable,
    hint: str,
    namespace: Callable[[], dict] | None = None,
) -> Callable[[Judge], Judge]:
    """Register the decorated judge as exercise ``name`` of ``chapter``."""

    def register(judge: Judge) -> Judge:
        if name in EXERCISES and EXERCISES[name].judge.__module__ != judge.__module__:
            raise ValueError(f"exercise name {name!r} is taken")
        EXERCISES[name] = Exercise(chapter, name, title, judge, solution, wrong, hint, namespace)
        return judge

    return register


def load_all() -> dict[str, Exercise]:
    """Import every chapter's exercise module; returns the registry."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("ch"):
            importlib.import_module(f"{package}.{info.name}")
    return EXERCISES


def of_chapter(chapter: str) -> list[Exercise]:
    return [ex for ex in load_all().values() if ex.chapter == chapter]


def check(name: str, answer: Any, engine: Engine | None = None) -> Verdict:
    """Judge ``answer`` for exercise ``name``; never raises (a raise is a failed verdict with the hint)."""
    ex = load_all().get(name)
    if ex is None:
        known = ", ".join(sorted(EXERCISES)) or "none"
        return Verdict(name, name, False, f"no exercise named {name!r}; known: {known}")
    if engine is None:
        from ..database import get_engine

        engine = get_engine()
    try:
        passed, message, measured = ex.judge(answer, engine)
    except Exception as exc:  # noqa: BLE001 - a verdict, never a traceback, in the lesson notebook
        first = (str(exc).splitlines() or [""])[0][:200]
        passed, message, measured = False, f"the answer raised {type(exc).__name__}: {first}", {}
    if not passed and ex.hint and "Hint:" not in message:
        message = f"{message.rstrip('.')}. Hint: {ex.hint}"
    return Verdict(name, ex.title, bool(passed), message, dict(measured))


def reveal(name: str) -> str:
    """The reference solution's source, for a trainer to show (``print(exercises.reveal("..."))``)."""
    ex = load_all()[name]
    return textwrap.dedent(inspect.getsource(ex.solution))
