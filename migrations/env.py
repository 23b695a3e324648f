"""Alembic environment of the workbook: the target metadata is ``helpers.models``.

Each revision runs in its own transaction (``transaction_per_migration``), so a multi-phase
change split over revisions commits phase by phase; steps that must not run in a transaction
(``CREATE INDEX CONCURRENTLY``, batched backfills) use ``op.get_context().autocommit_block()``.

**One lock policy for every revision** (no revision sets a limit of its own):

- every lock wait is bounded by ``LOCK_TIMEOUT`` (100 ms: an ``ALTER TABLE`` queued behind a long
  transaction stops all traffic on its table while it waits, so it must give up fast), through
  ``helpers.bounded``, set for the session before the first revision and again after each one;
- ``CREATE INDEX CONCURRENTLY`` (0005) alone waits up to ``CONCURRENT_LOCK_TIMEOUT``: its wait for
  older snapshots blocks no one, and a short limit would only throw the build away;
- when a wait expires (``LockWaitTimeout``: the revision's transaction rolled back), the upgrade
  is run again from the last committed revision, after a growing pause, up to ``LOCK_ATTEMPTS``
  times; the last failure is raised, naming the blocking session. A revision must therefore be
  safe to run again after a failure part-way (its autocommit steps idempotent and resumable).

``config.attributes`` (or ``-x lock_timeout=... -x lock_attempts=...``) override both. Offline mode
(``--sql``) is not supported: revisions 0003, 0004, 0005 and 0008 ask the database questions
(ranges to backfill, the server version, leftovers); ``helpers.migrate.revision_sql`` captures what
an online upgrade really sends instead.
"""

from __future__ import annotations

import logging
import time

from alembic import context
from sqlalchemy import create_engine, pool, text

from helpers import bounded, models
from helpers.waits import LockWaitTimeout

config = context.config
target_metadata = models.Base.metadata
log = logging.getLogger("alembic.env")

LOCK_TIMEOUT = "100ms"  # what chapter 06 teaches: give up fast...
LOCK_ATTEMPTS = 5  # ...and try again, a bounded number of times
BACKOFF_S = 0.2  # pause before attempt n+1: BACKOFF_S * n, at most 2 s
CONCURRENT_LOCK_TIMEOUT = "60s"  # CONCURRENTLY waits for old snapshots, blocking no one: 0005 waits this long

# tables that live in a workbook database but are not part of the models
IGNORED_TABLES = {"workbook_meta"}


def include_object(obj, name, type_, reflected, compare_to):
    """Leave the seed marker and the chapters' scratch schemas out of autogenerate."""
    if type_ == "table" and (name in IGNORED_TABLES or (getattr(obj, "schema", None) or "").startswith("wb_")):
        return False
    return True


def _setting(name: str, default):
    return config.attributes.get(name) or context.get_x_argument(as_dictionary=True).get(name) or default


def target_url():
    """The database to migrate: attributes, -x url=, sqlalchemy.url, else the chapter's own clone."""
    url = _setting("url", None) or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from helpers.database import database_url

    base = database_url()
    return base.set(database=f"{base.database}_migrations").render_as_string(hide_password=False)


def lock_limit() -> str:
    return str(_setting("lock_timeout", LOCK_TIMEOUT))


def _limit_again(ctx, step, heads, run_args) -> None:
    """After each revision (inside its transaction): the next one gets the limit too."""
    if ctx.connection is not None:
        ctx.connection.execute(text("SELECT set_config('lock_timeout', :v, false)"), {"v": lock_limit()})


def run_with_policy(connection) -> None:
    """Run the pending revisions under the lock policy: bounded waits, and the upgrade retried on a lock timeout."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        transaction_per_migration=True,
        compare_type=True,
        compare_server_default=True,
        on_version_apply=_limit_again,
    )
    config.attributes.setdefault("concurrent_lock_timeout", CONCURRENT_LOCK_TIMEOUT)
    attempts = int(_setting("lock_attempts", LOCK_ATTEMPTS))
    for attempt in range(1, attempts + 1):
        try:
            with bounded(connection, "The migration", lock_timeout=lock_limit(), session=True):
                with context.begin_transaction():
                    context.run_migrations()  # from the revision the database is at now
            return
        except LockWaitTimeout as exc:
            if attempt == attempts:
                raise
            if connection.in_transaction():
                connection.rollback()
            pause = min(BACKOFF_S * attempt, 2.0)
            log.warning("lock timeout (attempt %d of %d), trying again in %.1f s: %s", attempt, attempts, pause, exc)
            time.sleep(pause)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_policy(connection)
        return
    engine = create_engine(target_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_with_policy(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "Offline mode (--sql) is not supported: some revisions ask the database questions. "
        "helpers.migrate.revision_sql(engine) captures the SQL an online upgrade sends."
    )
run_migrations_online()
