"""rename users.name -> users.full_name by expand and contract, EXPAND: new column, dual write, backfill

Old code writes ``name``, new code writes ``full_name``: a trigger keeps the two equal whichever
one a statement sets, so both versions of the application can run side by side. The backfill
runs in committed batches. Reads switch to ``full_name`` in the application; 0009 contracts.

Resumable: every step can run again (``ADD COLUMN IF NOT EXISTS``, ``CREATE OR REPLACE``), and the
backfill walks the primary key in ranges (keyset batches, as 0003: no batch re-reads the rows
already filled, unlike ``WHERE id IN (SELECT ... LIMIT n)``), each batch its own transaction. When a
batch fails (a lock timeout: env.py retries the revision), what committed stays and the next run
goes on from there. Each step commits on its own (autocommit_block), so the ACCESS EXCLUSIVE of
``ADD COLUMN`` and ``CREATE TRIGGER`` is held for a moment each, never across the backfill.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SYNC_FUNCTION = """
CREATE OR REPLACE FUNCTION users_sync_full_name() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.full_name := COALESCE(NEW.full_name, NEW.name);
        NEW.name := COALESCE(NEW.name, NEW.full_name);
    ELSIF NEW.full_name IS DISTINCT FROM OLD.full_name THEN
        NEW.name := NEW.full_name;          -- new code wrote full_name
    ELSIF NEW.name IS DISTINCT FROM OLD.name OR NEW.full_name IS NULL THEN
        NEW.full_name := NEW.name;          -- old code wrote name (or the backfill touched the row)
    END IF;
    RETURN NEW;
END $$
"""


BATCH = sa.text("UPDATE users SET full_name = name WHERE id >= :lo AND id < :hi AND full_name IS NULL")


def upgrade() -> None:
    batch_size = int(context.config.attributes.get("batch_size", 2_000))
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        bind.exec_driver_sql("ALTER TABLE users ADD COLUMN IF NOT EXISTS full_name varchar(100)")
        bind.exec_driver_sql(SYNC_FUNCTION)
        bind.exec_driver_sql(
            "CREATE OR REPLACE TRIGGER users_sync_full_name BEFORE INSERT OR UPDATE ON users "
            "FOR EACH ROW EXECUTE FUNCTION users_sync_full_name()"
        )
        lo, last = bind.execute(sa.text("SELECT min(id), max(id) FROM users WHERE full_name IS NULL")).one()
        while lo is not None and lo <= last:
            bind.execute(BATCH, {"lo": lo, "hi": lo + batch_size})
            lo += batch_size


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS users_sync_full_name ON users")
    op.execute("DROP FUNCTION IF EXISTS users_sync_full_name()")
    op.drop_column("users", "full_name")
