"""Fixtures of the example test suite (chapter 08): a test database per run (per xdist worker), a transaction per test.

* ``test_engine`` (session scope): a database of the run's own, ``<workbook db>_examples_<worker>_<kernel>``,
  with the workbook schema and no rows; dropped when the run ends. Under pytest-xdist (``-n 2``) every
  worker is a process of its own with its own database: ``<worker>`` is ``PYTEST_XDIST_WORKER`` (``gw0``,
  ``gw1``), ``main`` without xdist. ``schema_database`` stamps it as the workbook's and records it as this
  process's, so ``drop_database`` drops only a database this worker provably created.
* ``session`` (function scope): the 2.x transaction-per-test pattern. The test's Session joins an
  outer transaction on one connection with ``join_transaction_mode="create_savepoint"``, so code
  under test may ``commit()`` (it releases a SAVEPOINT) and the fixture's final ROLLBACK still
  leaves nothing behind.
* ``async_session`` (function scope): the same recipe on asyncio (``AsyncEngine``, psycopg's async
  driver, ``AsyncSession``); anyio's pytest plugin runs the tests marked ``@pytest.mark.anyio``.
* ``where_it_ran`` (autouse): every test records its worker and ``current_database()`` as junit
  properties (chapter 08 reads them from ``--junitxml``).
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import NullPool, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from helpers import drop_database, schema_database, setup

from . import example_factories

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")  # gw0, gw1, ... under pytest-xdist


@pytest.fixture(scope="session")
def test_engine():
    setup(quiet=True)
    suffix = f"examples_{WORKER}"  # one database per xdist worker
    engine = schema_database(suffix)
    yield engine
    engine.dispose()
    drop_database(suffix)


@pytest.fixture(autouse=True)
def where_it_ran(record_property, test_engine):
    with test_engine.connect() as conn:
        record_property("database", conn.scalar(text("SELECT current_database()")))
    record_property("worker", WORKER)


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


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def async_session(test_engine):
    engine = create_async_engine(test_engine.url, poolclass=NullPool)  # postgresql+psycopg: its async driver
    try:
        async with engine.connect() as conn:
            outer = await conn.begin()
            async with AsyncSession(bind=conn, join_transaction_mode="create_savepoint") as s:
                yield s
            await outer.rollback()
    finally:
        await engine.dispose()
