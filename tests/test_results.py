"""Results files: what a run records, and comparing two runs on their declared conclusions."""

from __future__ import annotations

import json

import pytest
from conftest import run_helpers

from helpers.results import compare_results, ordering


def _write(folder, topic, conclusions, **data):
    folder.mkdir(parents=True, exist_ok=True)
    payload = dict(data)
    if conclusions is not None:
        payload["conclusions"] = conclusions
    (folder / f"{topic}.json").write_text(json.dumps(payload))


@pytest.mark.unit
def test_ordering_lists_keys_from_smallest_to_largest():
    assert ordering({"joined": 3.0, "lazy": 90.5, "selectin": 2.1}) == ["selectin", "joined", "lazy"]


@pytest.mark.unit
def test_runs_agreeing_on_conclusions_compare_equal_whatever_their_timings(tmp_path):
    _write(tmp_path / "a", "loading", {"fastest": ["selectin", "lazy"], "statements": 2}, median_ms=1.5)
    _write(tmp_path / "b", "loading", {"fastest": ["selectin", "lazy"], "statements": 2}, median_ms=9.0)
    assert compare_results(tmp_path / "a", tmp_path / "b") == []


@pytest.mark.unit
def test_a_flipped_ordering_a_changed_count_and_a_missing_topic_are_caught(tmp_path):
    _write(tmp_path / "a", "loading", {"fastest": ["selectin", "lazy"], "statements": 2})
    _write(tmp_path / "b", "loading", {"fastest": ["lazy", "selectin"], "statements": 3})
    _write(tmp_path / "a", "locks", {"matrix": [[True, False]]})
    diffs = compare_results(tmp_path / "a", tmp_path / "b")
    assert [d.split(":")[0] for d in diffs] == ["loading.fastest", "loading.statements", "locks"]


def test_compare_results_command_exits_1_on_a_flipped_ordering_and_0_on_agreement(tmp_path, engine, monkeypatch):
    from helpers import record

    for name, times in {"a": {"joined": 1.0, "lazy": 50.0}, "b": {"joined": 60.0, "lazy": 50.0}}.items():
        monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path / name))
        path = record("probe", {"times": times}, conclusions={"fastest_first": ordering(times)})
        assert json.loads(path.read_text())["conclusions"] == {"fastest_first": ordering(times)}
    a, b = str(tmp_path / "a" / "results"), str(tmp_path / "b" / "results")
    flipped = run_helpers("compare-results", a, b)
    assert flipped.returncode == 1
    assert "probe.fastest_first: ['joined', 'lazy']" in flipped.stdout
    same = run_helpers("compare-results", a, a)
    assert same.returncode == 0 and "agrees" in same.stdout
    missing = run_helpers("compare-results", str(tmp_path / "nowhere"), a)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) <= 3


def test_two_kernels_recording_one_topic_at_once_each_replace_it_whole(tmp_path, engine, monkeypatch):
    """Two learners sharing one output folder: the old fixed ``<topic>.json.tmp`` let one kernel
    rename the other's temporary file away (FileNotFoundError in chapter 03, now 03b, run twice at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import record

    monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path))

    def write(i):
        return record("shared", {"writer": i}, conclusions={"n": 1})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(64)))
    folder = tmp_path / "results"
    assert [p.name for p in folder.iterdir()] == ["shared.json"]
    assert json.loads((folder / "shared.json").read_text())["conclusions"] == {"n": 1}
