"""Exercises of every chapter: one way to state, check and reveal them.

An exercise is a task with a **starter** (a notebook cell tagged ``exercise-starter`` and the
exercise's name, which the learner edits), a **checker** that measures the learner's answer on the
server (statement counts, plan node types, buffers, lock waits, anomalies, rows), a **reference
solution** a trainer can reveal, and a **plausible wrong answer** that the tests use to prove the
checker's hint. ``check(name, answer)`` never raises: it returns a ``Verdict``, shown as a green or
red box, so the notebook runs headless with the starters in place.

A checker judges only what does not vary between runs (counts, plan shapes, rows, anomalies,
buffers), never a timing: asked twice, it gives the same verdict. ``tests/test_exercises.py``
proves every registered exercise from three sides (the notebook's starter fails, the wrong answer
fails with its hint, the solution passes) and twice.

A chapter's exercises live in ``helpers/exercises/chNN.py``: each defines a judge function,
decorated with ``@exercise(...)``, which takes the learner's answer and an engine and returns
``(passed, message, measured)``, and may raise (the raise becomes a failed verdict).
"""

# Chapter 01b's page of users: its lesson uses it too (section 1's cartesian pages).
from .ch01b import PAGE, page_for  # noqa: E402  (after the registry: ch01b registers its exercises in it)
from .registry import EXERCISES, Exercise, Verdict, check, exercise, load_all, of_chapter, reveal

__all__ = [
    "EXERCISES",
    "Exercise",
    "Verdict",
    "check",
    "exercise",
    "load_all",
    "of_chapter",
    "reveal",
    "PAGE",
    "page_for",
]
