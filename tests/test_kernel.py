"""A learner's kernel survives a stopped server: `setup()` brings it back, and a lost connection is
one paragraph that still fails the cell. Each test stops a private server (``state_dir``), never the
shared one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

PRIVATE = ("DATABASE_URL", "WORKBOOK_DB", "WORKBOOK_PORT", "WORKBOOK_STATE")

RECONNECT = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    from sqlalchemy import text
    from helpers import setup

    engine = setup(quiet=True)
    port = engine.url.port
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    stop = subprocess.run([sys.executable, "-m", "helpers", "db", "stop"], capture_output=True, text=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        failed = None
    except Exception as exc:
        failed = type(exc).__name__
    again = setup(quiet=True)
    with again.connect() as conn:
        one = conn.execute(text("SELECT 1")).scalar()

    # the server comes back on another port when its recorded one was taken meanwhile
    subprocess.run([sys.executable, "-m", "helpers", "db", "stop"], capture_output=True, check=True)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its connections linger in TIME_WAIT
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    print("---", flush=True)
    moved = setup(quiet=True)
    with moved.connect() as conn:
        two = conn.execute(text("SELECT 2")).scalar()
    print(json.dumps({
        "stop": stop.stdout.strip(), "failed": failed, "same_engine": again is engine,
        "same_port": again.url.port == port, "one": one,
        "moved_is_new": moved is not engine, "moved_port": moved.url.port != port, "two": two,
    }))
    """
)


def _private_env(state_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE}
    env["WORKBOOK_STATE"] = str(state_dir)
    return env


def test_setup_after_db_stop_reconnects_in_the_same_process(state_dir):
    res = subprocess.run(
        [sys.executable, "-c", RECONNECT],
        cwd=REPO,
        env=_private_env(state_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    before, after = res.stdout.split("---\n")
    out = json.loads(after.strip().splitlines()[-1])
    assert out["stop"] == "stopped" and out["failed"] == "OperationalError", out
    # the same Engine object works again: a learner's `engine` variable is not stale
    assert out["same_engine"] and out["same_port"] and out["one"] == 1, out
    # the recorded port was taken: a new engine on the new port, and setup() says so
    assert out["moved_is_new"] and out["moved_port"] and out["two"] == 2, out
    assert "The server came back on port " in after


def _cell_error(client, nb, index) -> dict:
    with pytest.raises(CellExecutionError):  # the kernel's reply says "error": nbmake and `make run` stop
        client.execute_cell(nb.cells[index], index)
    (error,) = [o for o in nb.cells[index].outputs if o["output_type"] == "error"]
    return error


def test_a_lost_connection_fails_the_cell_with_one_paragraph(state_dir, monkeypatch):
    for name in PRIVATE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKBOOK_STATE", str(state_dir))  # the kernel inherits this environment
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(c)
        for c in [
            "from sqlalchemy import text\nfrom helpers import server, setup\nengine = setup(quiet=True)",
            # a statement's OperationalError (here a timeout) keeps IPython's usual traceback
            "with engine.connect() as conn:\n"
            "    conn.execute(text(\"SET statement_timeout = '10ms'\"))\n"
            '    conn.execute(text("SELECT pg_sleep(1)"))',
            "server.stop()",
            'with engine.connect() as conn:\n    conn.execute(text("SELECT 1"))',  # the pooled connection died
            'with engine.connect() as conn:\n    conn.execute(text("SELECT 1"))',  # a new one is refused
            "again = setup(quiet=True)\nassert again is engine\n"
            'with engine.connect() as conn:\n    assert conn.execute(text("SELECT 1")).scalar() == 1',
        ]
    ]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        timeout = _cell_error(client, nb, 1)
        assert "QueryCanceled" in "".join(timeout["traceback"]) and "setup()" not in "".join(timeout["traceback"])
        client.execute_cell(nb.cells[2], 2)
        for index, cause in ((3, "terminating connection"), (4, "Connection refused")):
            error = _cell_error(client, nb, index)
            shown = "\n".join(error["traceback"])
            assert error["ename"] == "OperationalError", error
            assert len(shown) < 1000 and len(error["traceback"]) == 1, shown  # was 2,500 to 18,000 characters
            assert cause in shown and "not running" in shown and "engine = setup()" in shown, shown
            assert "Traceback" not in shown and "sqlalche.me" not in shown, shown
        client.execute_cell(nb.cells[5], 5)  # the same kernel, the same engine, working again
        assert not [o for o in nb.cells[5].outputs if o["output_type"] == "error"]
