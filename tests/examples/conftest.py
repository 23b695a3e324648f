"""Fixtures of the example test suite (chapter 08): a test database per run, a transaction per test.

* ``test_engine`` (session scope): a database of the run's own, ``<workbook db>_examples_<pid>``,
  with the workbook schema and no rows; dropped when the run ends.
* ``session`` (function scope): the 2.x transaction-per-test pattern. The test's Session joins an
  outer transaction on one connection with ``join_transaction_mode="create_savepoint"``, so code
  under test may ``commit()`` (it releases a SAVEPOINT) and the fixture's final ROLLBACK still
  leaves nothing behind.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy.orm import Session

from helpers import drop_database, schema_database, setup

from . import example_factories


@pytest.fixture(scope="session")
def test_engine():
    setup(quiet=True)
    suffix = f"examples_{os.getpid()}"
    engine = schema_database(suffix)
    yield engine
    engine.dispose()
    drop_database(suffix)


@pytest.fixture
def connection(test_engine):
    with test_engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def session(connection):
    with Session(bind=connection, join_transaction_mode="create_savepoint") as s:
        example_factories.bind(s)
        yield s
        example_factories.bind(None)
