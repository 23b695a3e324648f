"""Shared fixtures: the workbook engine, and throwaway servers/databases for tests that need their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

EMBEDDED_ONLY = (
    "needs the workbook's embedded server (its own throwaway servers, its defaults); DATABASE_URL is set: "
    "unset it to run this test"
)


def pytest_configure(config):
    config.addinivalue_line("markers", f"embedded: {EMBEDDED_ONLY} (skipped under DATABASE_URL)")


SERVER_FIXTURES = {"engine", "scratch_db", "state_dir"}


def pytest_collection_modifyitems(config, items):
    """A unit test may not ask for a server; tests marked ``@pytest.mark.embedded`` skip, with the reason,
    when DATABASE_URL points elsewhere."""
    for item in items:
        if item.get_closest_marker("unit") and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(
                f"{item.nodeid} is marked unit but uses {sorted(SERVER_FIXTURES & set(item.fixturenames))}: "
                "the unit lane runs without a database server"
            )
    if not os.environ.get("DATABASE_URL"):
        return
    skip = pytest.mark.skip(reason=EMBEDDED_ONLY)
    for item in items:
        if item.get_closest_marker("embedded"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine():
    from helpers import setup

    return setup(quiet=True)


def run_helpers(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m helpers ...`` in a fresh process (settings are read from its environment)."""
    private = {"DATABASE_URL", "WORKBOOK_DB", "WORKBOOK_PORT", "WORKBOOK_STATE"}  # WORKBOOK_PG_BIN is kept
    full_env = {k: v for k, v in os.environ.items() if k not in private}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "helpers", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def state_dir():
    """A private state folder for a server of the test's own (readable by the server user as root)."""
    path = Path(tempfile.mkdtemp(prefix="qowb-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    run_helpers("db", "stop", env={"WORKBOOK_STATE": str(path)})
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch_db(engine):
    """An empty database of the test's own on the workbook server (``empty_database``); dropped afterwards."""
    from helpers import drop_database, empty_database

    made = []

    def make(suffix: str) -> str:
        eng = empty_database(f"t_{suffix}")
        eng.dispose()
        made.append(f"t_{suffix}")
        return eng.url.database

    yield make
    for suffix in made:
        drop_database(suffix)
