"""TRAINING.md's plans add up: from the chapters' own teaching times and the exercises, to the day they claim.

A plan is a Markdown table under a ``## ... plan`` heading (``### Day N`` for a plan of several days):
``| start | block | minutes |``. A chapter row names the chapter (``01a · ...``) and the exercises taught
in it (their names, in backticks); its minutes cover the chapter's box time (``> **Time:** about N
minutes``) plus ``EXERCISE_MINUTES`` per exercise. Each row starts when the previous one ends, and the
day's last row ends at the time the day's heading claims (``09:00–17:00``).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from helpers import exercises

REPO = Path(__file__).resolve().parent.parent
EXERCISE_MINUTES = 10  # a learner's attempt, the checker, and the trainer's reveal
_ROW = re.compile(r"^\|\s*(\d{2}:\d{2})\s*\|(.+)\|\s*(\d+)\s*\|\s*$")
_DAY = re.compile(r"^#{2,3} .*?(\d{2}:\d{2})\s*[–-]\s*(\d{2}:\d{2})")
_CHAPTER = re.compile(r"^\s*\**(\d{2}[a-z]?) ·")


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def _box_minutes() -> dict[str, int]:
    out = {}
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb")):
        first = nbformat.read(path, 4).cells[0].source
        found = re.search(r"\*\*Time:\*\*\s*about\s+(\d+)\s+minutes", first)
        assert found, f"{path.name} states no teaching time in its box"
        out[path.name.split("_")[0]] = int(found.group(1))
    return out


def _days() -> list[tuple[str, int, int, list[tuple[int, str, int]]]]:
    """(heading, start, end, rows) per day of every plan in TRAINING.md."""
    days, current = [], None
    for line in (REPO / "TRAINING.md").read_text().splitlines():
        day = _DAY.match(line)
        if day:
            current = (line.strip("# "), _minutes(day.group(1)), _minutes(day.group(2)), [])
            days.append(current)
            continue
        row = _ROW.match(line)
        if row and current is not None:
            current[3].append((_minutes(row.group(1)), row.group(2).strip(), int(row.group(3))))
    return days


DAYS = _days() if (REPO / "TRAINING.md").exists() else []


def test_there_is_a_one_day_and_a_two_day_plan():
    text = (REPO / "TRAINING.md").read_text()
    assert re.search(r"^## One-day plan", text, re.M) and re.search(r"^## Two-day plan", text, re.M)
    assert len(DAYS) == 3, [d[0] for d in DAYS]


@pytest.mark.parametrize("day", DAYS, ids=[d[0] for d in DAYS])
def test_each_day_adds_up_to_what_it_claims(day):
    heading, start, end, rows = day
    assert rows and rows[0][0] == start, f"{heading}: the first block does not start at the day's start"
    for (t, block, minutes), (t_next, _, _) in zip(rows, rows[1:], strict=False):
        assert t + minutes == t_next, f"{heading}: {block!r} ends at {t + minutes} min, the next starts at {t_next}"
    last_t, _, last_m = rows[-1]
    assert last_t + last_m == end, f"{heading}: the day ends at {last_t + last_m} min, not as claimed"


@pytest.mark.parametrize("day", DAYS, ids=[d[0] for d in DAYS])
def test_each_chapter_block_covers_its_box_time_and_its_exercises(day):
    boxes, registry = _box_minutes(), exercises.load_all()
    for _, block, minutes in day[3]:
        chapter = _CHAPTER.match(block)
        if not chapter:
            continue
        number = chapter.group(1)
        assert number in boxes, f"{block!r} names no notebook"
        named = re.findall(r"`([a-z0-9_]+)`", block)
        for name in named:
            assert name in registry and registry[name].chapter == number, f"{name} is not an exercise of {number}"
        need = boxes[number] + EXERCISE_MINUTES * len(named)
        assert minutes >= need, f"{block!r}: {minutes} min for {boxes[number]} min of chapter + {len(named)} exercises"


def _self_study() -> list[str]:
    """The exercises listed under ``## Exercises for self-study`` (names in backticks, one bullet per chapter)."""
    text = (REPO / "TRAINING.md").read_text()
    found = re.search(r"^## Exercises for self-study\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, "TRAINING.md lists no exercises for self-study"
    return re.findall(r"`([a-z0-9_]+)`", found.group(1))


def test_the_two_day_plan_teaches_every_chapter_with_an_exercise_and_lists_the_rest_for_self_study():
    """Every chapter once, each with at least one exercise in the room; every other exercise is listed
    for self-study, so each exercise is reached exactly once."""
    two_day = [d for d in DAYS if "Day" in d[0]]
    blocks = [b for d in two_day for _, b, _ in d[3]]
    chapters = [m.group(1) for b in blocks if (m := _CHAPTER.match(b))]
    assert sorted(chapters) == sorted(_box_minutes()), chapters
    for block in blocks:
        if _CHAPTER.match(block) and not block.startswith("**00"):
            assert re.findall(r"`([a-z0-9_]+)`", block), f"{block!r} teaches no exercise"
    named = [n for b in blocks if _CHAPTER.match(b) for n in re.findall(r"`([a-z0-9_]+)`", b)]
    assert sorted(named + _self_study()) == sorted(exercises.load_all()), (
        "each exercise: in the room or self-study, once"
    )
