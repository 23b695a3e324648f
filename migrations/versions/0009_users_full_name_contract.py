"""rename users.name -> users.full_name by expand and contract, CONTRACT: drop the old column

Run only once no deployed code reads or writes ``name``. The downgrade expands again: it brings
``name`` back, fills it, and re-creates the dual-write trigger.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# the dual-write trigger of 0008, repeated here so each revision stands alone
SYNC_FUNCTION = """
CREATE OR REPLACE FUNCTION users_sync_full_name() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.full_name := COALESCE(NEW.full_name, NEW.name);
        NEW.name := COALESCE(NEW.name, NEW.full_name);
    ELSIF NEW.full_name IS DISTINCT FROM OLD.full_name THEN
        NEW.name := NEW.full_name;
    ELSIF NEW.name IS DISTINCT FROM OLD.name OR NEW.full_name IS NULL THEN
        NEW.full_name := NEW.name;
    END IF;
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("DROP TRIGGER IF EXISTS users_sync_full_name ON users")
    op.execute("DROP FUNCTION IF EXISTS users_sync_full_name()")
    op.alter_column("users", "full_name", existing_type=sa.String(100), nullable=False)
    op.drop_column("users", "name")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.add_column("users", sa.Column("name", sa.String(100), nullable=True))
    op.execute("UPDATE users SET name = full_name")
    op.alter_column("users", "name", existing_type=sa.String(100), nullable=False)
    op.alter_column("users", "full_name", existing_type=sa.String(100), nullable=True)
    op.execute(SYNC_FUNCTION)
    op.execute(
        "CREATE TRIGGER users_sync_full_name BEFORE INSERT OR UPDATE ON users "
        "FOR EACH ROW EXECUTE FUNCTION users_sync_full_name()"
    )
