"""rename users.name -> users.full_name by expand and contract, EXPAND: new column, dual write, backfill

Old code writes ``name``, new code writes ``full_name``: a trigger keeps the two equal whichever
one a statement sets, so both versions of the application can run side by side. The backfill
runs in committed batches. Reads switch to ``full_name`` in the application; 0009 contracts.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

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


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.add_column("users", sa.Column("full_name", sa.String(100), nullable=True))
    op.execute(SYNC_FUNCTION)
    op.execute(
        "CREATE TRIGGER users_sync_full_name BEFORE INSERT OR UPDATE ON users "
        "FOR EACH ROW EXECUTE FUNCTION users_sync_full_name()"
    )
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        while bind.exec_driver_sql(
            "UPDATE users SET full_name = name WHERE id IN "
            "(SELECT id FROM users WHERE full_name IS NULL ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)"
        ).rowcount:
            pass


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("DROP TRIGGER IF EXISTS users_sync_full_name ON users")
    op.execute("DROP FUNCTION IF EXISTS users_sync_full_name()")
    op.drop_column("users", "full_name")
