"""rename users.name -> users.full_name by expand and contract, CONTRACT: drop the old column

Run only once no deployed code reads or writes ``name``, and no deployed model still maps it:
an ORM model lists every mapped column in its SELECTs, so dropping a column the running code still
maps fails every one of its queries (chapter 06, section 9: the deploy order).

``full_name`` becomes NOT NULL the safe way, as in 0004 (never the scanning ``SET NOT NULL`` under
ACCESS EXCLUSIVE): ``CHECK (full_name IS NOT NULL) NOT VALID``, ``VALIDATE`` (SHARE UPDATE
EXCLUSIVE: reads and writes go on), then ``SET NOT NULL`` (proven by the check: no scan), then the
check is dropped. Each step commits on its own and can run again (a retry after a lock timeout). The downgrade expands again: it brings
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


STATE = sa.text(
    "SELECT (SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'full_name'), "
    "EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'users'::regclass AND conname = 'users_full_name_not_null')"
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        bind.exec_driver_sql("DROP TRIGGER IF EXISTS users_sync_full_name ON users")
        bind.exec_driver_sql("DROP FUNCTION IF EXISTS users_sync_full_name()")
        not_null, constraint = bind.execute(STATE).one()
        if not not_null:
            if not constraint:
                bind.exec_driver_sql(
                    "ALTER TABLE users ADD CONSTRAINT users_full_name_not_null CHECK (full_name IS NOT NULL) NOT VALID"
                )
            bind.exec_driver_sql("ALTER TABLE users VALIDATE CONSTRAINT users_full_name_not_null")
            bind.exec_driver_sql(
                "ALTER TABLE users ALTER COLUMN full_name SET NOT NULL"
            )  # no scan: the check proves it
        bind.exec_driver_sql("ALTER TABLE users DROP CONSTRAINT IF EXISTS users_full_name_not_null")
        bind.exec_driver_sql("ALTER TABLE users DROP COLUMN IF EXISTS name")


def downgrade() -> None:
    op.add_column("users", sa.Column("name", sa.String(100), nullable=True))
    op.execute("UPDATE users SET name = full_name")
    op.alter_column("users", "name", existing_type=sa.String(100), nullable=False)
    op.alter_column("users", "full_name", existing_type=sa.String(100), nullable=True)
    op.execute(SYNC_FUNCTION)
    op.execute(
        "CREATE TRIGGER users_sync_full_name BEFORE INSERT OR UPDATE ON users "
        "FOR EACH ROW EXECUTE FUNCTION users_sync_full_name()"
    )
