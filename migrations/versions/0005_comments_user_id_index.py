"""index comments.user_id with CREATE INDEX CONCURRENTLY (writes go on during the build)

CONCURRENTLY cannot run inside a transaction: autocommit_block commits Alembic's transaction,
runs the statement on its own, and opens a new one. A failed concurrent build leaves an INVALID
index behind; we drop such a leftover first so the migration can simply be run again.

The build waits for every transaction that holds a snapshot older than its own, on ANY table of the
database (chapter 06, section 5), and that wait counts against ``lock_timeout``. Waiting blocks no
one (SHARE UPDATE EXCLUSIVE conflicts only with other DDL and VACUUM), so this step alone waits up to
env.py's ``concurrent_lock_timeout`` instead of the 100 ms of every other step: a short limit would
only throw finished work away and start again.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import context, op

from helpers import bounded

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEX = "ix_comments_user_id"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        leftover = bind.exec_driver_sql(
            "SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('ix_comments_user_id') AND NOT indisvalid"
        ).scalar()
        limit = context.config.attributes["concurrent_lock_timeout"]
        with bounded(bind, "CREATE INDEX CONCURRENTLY ix_comments_user_id", lock_timeout=limit, session=True):
            if leftover:
                op.drop_index(INDEX, table_name="comments", postgresql_concurrently=True)
            op.create_index(INDEX, "comments", ["user_id"], postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="comments", postgresql_concurrently=True, if_exists=True)
