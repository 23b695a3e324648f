"""multi-phase NOT NULL, phase 2: backfill comments.score in small committed batches

Each batch is its own short transaction (autocommit_block), so a concurrent writer waits at most
for one batch, never for the whole table. ``config.attributes["batch_size"]`` sets the batch size
and ``config.attributes["progress"]`` (a callable taking the rows done) reports progress.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = sa.text(
    "UPDATE comments SET score = length(body) % 100 "
    "WHERE id IN (SELECT id FROM comments WHERE score IS NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)"
)


def upgrade() -> None:
    attrs = context.config.attributes
    batch_size = int(attrs.get("batch_size", 2_000))
    progress = attrs.get("progress")
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        while True:
            done = bind.execute(BATCH, {"n": batch_size}).rowcount
            if progress:
                progress(done)
            if done == 0:
                break


def downgrade() -> None:
    # nothing to undo: the values go away with the column when 0002 is downgraded
    pass
