"""index comments.user_id with CREATE INDEX CONCURRENTLY (writes go on during the build)

CONCURRENTLY cannot run inside a transaction: autocommit_block commits Alembic's transaction,
runs the statement on its own, and opens a new one. A failed concurrent build leaves an INVALID
index behind; we drop such a leftover first so the migration can simply be run again.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

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
        if leftover:
            op.drop_index(INDEX, table_name="comments", postgresql_concurrently=True)
        op.create_index(INDEX, "comments", ["user_id"], postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="comments", postgresql_concurrently=True, if_exists=True)
