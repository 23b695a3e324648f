"""multi-phase NOT NULL, phase 1: add comments.score as a nullable column (no rewrite, no scan)

Then ``SET DEFAULT 0``: from this commit on, rows inserted by code that does not know the column yet
get a score, so the backfill (0003) has only the old rows to fill and 0004 finds no NULL.
Both statements only change the catalog (ACCESS EXCLUSIVE for a moment, under env.py's lock policy).

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
    op.add_column("comments", sa.Column("score", sa.Integer(), nullable=True))
    op.alter_column("comments", "score", server_default=sa.text("0"))  # new rows only: old ones stay NULL


def downgrade() -> None:
    op.drop_column("comments", "score")
