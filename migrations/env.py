"""Alembic environment of the workbook: the target metadata is ``helpers.models``.

Each revision runs in its own transaction (``transaction_per_migration``), so a multi-phase
change split over revisions commits phase by phase; steps that must not run in a transaction
(``CREATE INDEX CONCURRENTLY``, batched backfills) use ``op.get_context().autocommit_block()``.

Every revision runs under the workbook's lock limit (``helpers.waits.bounded``, 5 s unless
``WORKBOOK_LOCK_TIMEOUT`` says otherwise, or ``config.attributes["lock_timeout"]``): set for the
session before the first revision and set again after each one (a revision may ``RESET
lock_timeout``). A revision may set a shorter limit of its own (``SET LOCAL lock_timeout``). When a
wait expires, the error names the blocking session.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from helpers import models
from helpers.waits import bounded, default_lock_timeout

config = context.config
target_metadata = models.Base.metadata

# tables that live in a workbook database but are not part of the models
IGNORED_TABLES = {"workbook_meta"}


def include_object(obj, name, type_, reflected, compare_to):
    """Leave the seed marker and the chapters' scratch schemas out of autogenerate."""
    if type_ == "table" and (name in IGNORED_TABLES or (getattr(obj, "schema", None) or "").startswith("wb_")):
        return False
    return True


def target_url():
    """The database to migrate: attributes, -x url=, sqlalchemy.url, else the chapter's own clone."""
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from helpers.database import database_url

    base = database_url()
    return base.set(database=f"{base.database}_migrations").render_as_string(hide_password=False)


def lock_limit() -> str:
    return config.attributes.get("lock_timeout") or default_lock_timeout()


def _limit_again(ctx, step, heads, run_args) -> None:
    """After each revision (inside its transaction): the next one gets the limit too."""
    if not ctx.as_sql and ctx.connection is not None:
        ctx.connection.execute(text("SELECT set_config('lock_timeout', :v, false)"), {"v": lock_limit()})


def configure(**kw) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=include_object,
        transaction_per_migration=True,
        compare_type=True,
        compare_server_default=True,
        on_version_apply=_limit_again,
        **kw,
    )


def run_bounded(connection) -> None:
    configure(connection=connection)
    with bounded(connection, "The migration", lock_timeout=lock_limit(), session=True):
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_offline() -> None:
    configure(url=target_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    context.execute(text("SELECT set_config('lock_timeout', :v, false)").bindparams(v=lock_limit()))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_bounded(connection)
        return
    engine = create_engine(target_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_bounded(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
