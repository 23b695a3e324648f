"""foreign key in two steps, step 2: VALIDATE (SHARE UPDATE EXCLUSIVE: reads and writes go on)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE posts VALIDATE CONSTRAINT posts_editor_id_fkey")


def downgrade() -> None:
    # a validated constraint cannot be "unvalidated"; 0006's downgrade drops it
    pass
