"""The run's landing page, built from a run's folder (no server needed)."""

from __future__ import annotations

import json
import re

import nbformat
import pytest

from helpers.report import build_index, chapter_title, export_html, plot_names, results_topic

pytestmark = pytest.mark.unit  # files only: no server


def _nb():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# 07 · Raw SQL vs ORM\n\nWhen is the ORM right? More text.\n\n**You will learn**"
        ),
        nbformat.v4.new_code_cell('fig = 1\nplots.save(fig, "rawsql_report")\nshow(fig, "rawsql_other")'),
        nbformat.v4.new_code_cell('path = record("rawsql", {"x": 1})'),
    ]
    return nb


def test_a_chapter_html_carries_its_title_and_links_to_index_and_neighbours():
    nb = _nb()
    assert chapter_title(nb) == "07 · Raw SQL vs ORM"
    assert plot_names(nb) == ["rawsql_report", "rawsql_other"] and results_topic(nb) == "rawsql"
    page = export_html(nb, chapter_title(nb), prev=("06_x.html", "06 · Six"), nxt=("08_y.html", "08 · Eight"))
    assert re.search(r"<title>07 · Raw SQL vs ORM</title>", page)
    for href in ["index.html", "06_x.html", "08_y.html"]:
        assert f'href="{href}"' in page


def test_the_index_lists_chapters_in_order_with_figures_and_existing_thumbnails_only(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "rawsql_report.png").write_bytes(b"png")
    (tmp_path / "results" / "rawsql.json").write_text(
        json.dumps({"conclusions": {"copy_fastest": True, "order": ["copy", "orm"]}, "meta": {}})
    )
    chapters = [
        {
            "file": "07_r.html",
            "title": "07 · Raw",
            "summary": "s7",
            "seconds": 12.3,
            "status": "ok",
            "topic": "rawsql",
            "plots": ["rawsql_report", "rawsql_missing"],
        },
        {
            "file": "08_t.html",
            "title": "08 · Test",
            "summary": "s8",
            "seconds": None,
            "status": "not run",
            "topic": None,
            "plots": [],
        },
    ]
    (tmp_path / "07_r.html").write_text("<html></html>")
    page = build_index(tmp_path, chapters, {"scale": "ci", "server": "PostgreSQL 18"}).read_text()
    assert page.index("07 · Raw") < page.index("08 · Test")
    assert 'href="07_r.html"' in page and 'href="08_t.html"' not in page  # links only to pages that exist
    assert "copy fastest: <b>True</b>" in page and "copy &lt; orm" in page
    assert "plots/rawsql_report.png" in page and "rawsql_missing" not in page
    assert "scale: ci" in page and "http" not in page.replace('lang="en"', "")  # readable offline
