"""foreign key in two steps, step 1: posts.editor_id REFERENCES users NOT VALID (no scan)

ADD FOREIGN KEY takes SHARE ROW EXCLUSIVE on both tables: writes to posts AND users wait while
it holds them. NOT VALID skips the scan of existing rows, so that moment is short.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("posts", sa.Column("editor_id", sa.Integer(), nullable=True))
    op.create_foreign_key("posts_editor_id_fkey", "posts", "users", ["editor_id"], ["id"], postgresql_not_valid=True)


def downgrade() -> None:
    op.drop_constraint("posts_editor_id_fkey", "posts", type_="foreignkey")
    op.drop_column("posts", "editor_id")
