"""`make run`: stops at the first failing notebook naming the cell and the error, one run per output
folder, and SIGINT/SIGTERM stop it in one line, leaving nothing the notebook made."""

from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psycopg
import pytest
from conftest import REPO, run_helpers

from helpers import is_embedded, psycopg_conninfo
from helpers.runner import NOTEBOOKS, output_lock, run_notebooks


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
    index = (tmp_path / "out" / "index.html").read_text()  # written whether the run passed or not
    titles = [
        nbformat.read(p, 4).cells[0].source.splitlines()[0][2:] for p in sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    ]
    assert all(html.escape(t) in index for t in titles), [t for t in titles if html.escape(t) not in index]
    assert index.count("not run in this run") == len(titles)


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def test_the_failure_line_shows_the_error_not_sqlalchemys_link(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path / "out"))
    nb = _notebook(
        tmp_path / "97_sql.ipynb",
        "from sqlalchemy import text\nfrom helpers import get_engine",
        'with get_engine().connect() as conn:\n    conn.execute(text("SELECT * FROM wb_no_such_table"))',
    )
    assert run_notebooks([str(nb)], timeout=60) == 1
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "FAILED" in ln]
    assert line.endswith(
        "FAILED in cell 1 after " + line.split("after ")[1].split(":")[0] + ": ProgrammingError: "
        '(psycopg.errors.UndefinedTable) relation "wb_no_such_table" does not exist'
    ), line
    assert "sqlalche.me" not in line


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    nb = _notebook(tmp_path / "97_any.ipynb", "x = 1")
    with output_lock(out):  # this process plays the run that holds the folder
        res = run_helpers("run", str(nb), env={"WORKBOOK_OUTPUT": str(out)}, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"pid {os.getpid()}" in res.stderr and "WORKBOOK_OUTPUT" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (out / "97_any.ipynb").exists(), "the refused run wrote nothing"


def _run_until(tmp_path, nb, ready, timeout=180) -> subprocess.Popen:
    env = dict(os.environ, WORKBOOK_OUTPUT=str(tmp_path / "out"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "helpers", "run", str(nb)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the notebook never got there"
        time.sleep(0.2)
    return proc


def _databases(like: str) -> list[str]:
    with psycopg.connect(**psycopg_conninfo("postgres")) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,))]


def _working_in(folder: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd").startswith(folder):
                found.append(entry)
    return found


def test_sigint_stops_the_run_in_one_line_and_removes_what_the_notebook_made(engine, tmp_path):
    """Chapter 05 builds a throwaway server in the background, chapter 06 a clone database: a run
    interrupted while both exist leaves neither, exits 130, and says where it stopped in one line."""
    if not is_embedded():
        pytest.skip("the throwaway server needs the embedded PostgreSQL binaries (DATABASE_URL is set)")
    marker = tmp_path / "throwaway"
    nb = _notebook(
        tmp_path / "97_interrupted.ipynb",
        "from helpers import setup, empty_database\nengine = setup(quiet=True)",
        "scratch = empty_database('t_runint')",
        "import pathlib\nfrom helpers.pooling import TooManyClients\nthrowaway = TooManyClients()\n"
        f"pathlib.Path({str(marker)!r}).write_text(throwaway.state)",
        "import time\ntime.sleep(600)",
    )

    def half_built():  # the throwaway's initdb has begun: a data folder exists
        return marker.exists() and any(Path(marker.read_text()).glob("pg*/data"))

    proc = _run_until(tmp_path, nb, half_built)
    folder = marker.read_text()
    assert _databases(r"%\_t\_runint\_%"), "the clone database exists before the interrupt"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err and not err.strip(), err
    (line,) = out.strip().splitlines()
    assert "97_interrupted.ipynb ... interrupted (SIGINT) at cell " in line, line
    # the clone database goes either way: the kernel drops its own at exit, or the runner drops what the run
    # recorded (and says so); which one gets there first depends on the machine's load, so only "gone" is asserted
    assert not os.path.exists(folder), f"{folder} was left behind"
    assert not _working_in(folder), "a process of the throwaway server still runs"
    assert not _databases(r"%\_t\_runint\_%"), "the clone database was left behind"
    assert time.monotonic() - t0 < 90


def test_sigterm_stops_the_run_and_drops_its_database(engine, tmp_path):
    marker = tmp_path / "made"
    nb = _notebook(
        tmp_path / "97_terminated.ipynb",
        "import pathlib\nfrom helpers import empty_database\nscratch = empty_database('t_runterm')\n"
        f"pathlib.Path({str(marker)!r}).touch()",
        "import time\ntime.sleep(600)",
    )
    proc = _run_until(tmp_path, nb, marker.exists)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "interrupted (SIGTERM) at cell 1" in out and "Traceback" not in out + err, (out, err)
    assert not _databases(r"%\_t\_runterm\_%")


@pytest.mark.unit
def test_only_throwaway_folders_proven_orphaned_are_removed():
    """A `wb-pool-*` folder goes only with the owner file the demo wrote and its owner dead."""
    import tempfile

    from helpers.pooling import OWNER_FILE, reap_throwaways

    dead = subprocess.Popen(["true"])
    dead.wait()
    made = {}
    for case, owner in (("dead", dead.pid), ("alive", os.getpid()), ("unproven", None), ("forged", dead.pid)):
        folder = tempfile.mkdtemp(prefix="wb-pool-")
        (Path(folder) / "pg18").mkdir()
        if owner is not None:
            mark = "something else" if case == "forged" else "qo-workbook throwaway server"
            (Path(folder) / OWNER_FILE).write_text(json.dumps({"mark": mark, "owner": owner, "child": None}))
        made[case] = folder
    try:
        assert reap_throwaways(owner_pid=os.getpid() + 10**7, wait_s=0) == []  # not that owner's
        removed = reap_throwaways(wait_s=0)  # any dead owner, as TooManyClients does before it starts
        assert made["dead"] in removed and not os.path.exists(made["dead"])
        assert all(os.path.isdir(made[c]) for c in ("alive", "unproven", "forged"))
    finally:
        for folder in made.values():
            shutil.rmtree(folder, ignore_errors=True)


def test_chapters_are_selected_by_number_and_a_wrong_one_is_named():
    from helpers.config import WorkbookError
    from helpers.runner import notebooks

    every = notebooks()
    assert [p.name.split("_")[0] for p in notebooks(["00"])] == ["00"]
    first = [p for p in every if p.name.startswith("01")]
    assert notebooks(["01"]) == first and len(first) >= 1  # a split chapter: 01a and 01b, in order
    with pytest.raises(WorkbookError) as bad:
        notebooks(["42"])
    assert "42" in str(bad.value) and "00" in str(bad.value) and len(str(bad.value).splitlines()) == 1
