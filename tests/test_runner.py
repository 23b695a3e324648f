"""`make run` stops at the first failing notebook and names the failing cell."""

from __future__ import annotations

import nbformat

from helpers.runner import run_notebooks


def test_run_stops_at_failure_and_names_the_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path / "out"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# demo"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("assert x == 2, 'the lesson stopped being true'"),
    ]
    bad = tmp_path / "98_bad.ipynb"
    never = tmp_path / "99_never.ipynb"
    nbformat.write(nb, bad)
    nbformat.write(nbformat.v4.new_notebook(), never)
    assert run_notebooks([str(bad), str(never)], timeout=60) == 1
    out = capsys.readouterr().out
    assert "98_bad.ipynb ... FAILED in cell 2" in out and "the lesson stopped being true" in out
    assert "99_never" not in out, "the run must stop at the first failure"
    assert (tmp_path / "out" / "98_bad.html").exists(), "the executed copy is kept for reading"
