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

# keyset batches: walk the primary key in ranges, so no batch re-reads the rows already filled
BATCH = sa.text("UPDATE comments SET score = length(body) % 100 WHERE id >= :lo AND id < :hi AND score IS NULL")


def upgrade() -> None:
    attrs = context.config.attributes
    batch_size = int(attrs.get("batch_size", 2_000))
    progress = attrs.get("progress")
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        lo, last = bind.execute(sa.text("SELECT min(id), max(id) FROM comments")).one()
        while lo is not None and lo <= last:
            done = bind.execute(BATCH, {"lo": lo, "hi": lo + batch_size}).rowcount
            if progress:
                progress(done)
            lo += batch_size


def downgrade() -> None:
    # nothing to undo: the values go away with the column when 0002 is downgraded
    pass
