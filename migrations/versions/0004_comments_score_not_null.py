"""multi-phase NOT NULL, phase 3: make comments.score NOT NULL without a long ACCESS EXCLUSIVE scan

PostgreSQL 18: ``ADD CONSTRAINT ... NOT NULL score NOT VALID`` (instant) then ``VALIDATE`` (SHARE
UPDATE EXCLUSIVE: reads and writes go on while it scans). Before 18: ``CHECK (score IS NOT NULL)
NOT VALID``, ``VALIDATE``, then ``SET NOT NULL``, which uses the valid check instead of scanning
(PostgreSQL 12+), then drop the check. Every step commits on its own (autocommit_block).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        bind.exec_driver_sql("SET lock_timeout = '2s'")
        if bind.dialect.server_version_info >= (18,):
            bind.exec_driver_sql("ALTER TABLE comments ADD CONSTRAINT comments_score_not_null NOT NULL score NOT VALID")
            bind.exec_driver_sql("ALTER TABLE comments VALIDATE CONSTRAINT comments_score_not_null")
        else:
            bind.exec_driver_sql(
                "ALTER TABLE comments ADD CONSTRAINT comments_score_not_null CHECK (score IS NOT NULL) NOT VALID"
            )
            bind.exec_driver_sql("ALTER TABLE comments VALIDATE CONSTRAINT comments_score_not_null")
            bind.exec_driver_sql("ALTER TABLE comments ALTER COLUMN score SET NOT NULL")  # no scan: the check proves it
            bind.exec_driver_sql("ALTER TABLE comments DROP CONSTRAINT comments_score_not_null")
        bind.exec_driver_sql("RESET lock_timeout")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.alter_column("comments", "score", nullable=True)
