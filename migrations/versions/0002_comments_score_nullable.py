"""multi-phase NOT NULL, phase 1: add comments.score as a nullable column (no rewrite, no scan)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ACCESS EXCLUSIVE for a moment: bound the wait so a long reader cannot make us queue everyone
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.add_column("comments", sa.Column("score", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.drop_column("comments", "score")
