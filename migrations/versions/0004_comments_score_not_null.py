"""multi-phase NOT NULL, phase 3: make comments.score NOT NULL without a long ACCESS EXCLUSIVE scan

PostgreSQL 18: ``ADD CONSTRAINT ... NOT NULL score NOT VALID`` (instant) then ``VALIDATE`` (SHARE
UPDATE EXCLUSIVE: reads and writes go on while it scans). Before 18: ``CHECK (score IS NOT NULL)
NOT VALID``, ``VALIDATE``, then ``SET NOT NULL``, which uses the valid check instead of scanning
(PostgreSQL 12+), then drop the check. Every step commits on its own (autocommit_block), under
env.py's lock policy; each step checks what is already done, so a retry after a lock timeout
part-way resumes instead of failing on "constraint already exists".

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NAME = "comments_score_not_null"
STATE = sa.text(
    "SELECT (SELECT attnotnull FROM pg_attribute WHERE attrelid = 'comments'::regclass AND attname = 'score'), "
    "EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'comments'::regclass AND conname = :name)"
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        not_null, constraint = bind.execute(STATE, {"name": NAME}).one()
        if bind.dialect.server_version_info >= (18,):
            if not constraint:
                bind.exec_driver_sql(
                    "ALTER TABLE comments ADD CONSTRAINT comments_score_not_null NOT NULL score NOT VALID"
                )
            bind.exec_driver_sql(
                "ALTER TABLE comments VALIDATE CONSTRAINT comments_score_not_null"
            )  # a no-op once valid
            return
        if not not_null:
            if not constraint:
                bind.exec_driver_sql(
                    "ALTER TABLE comments ADD CONSTRAINT comments_score_not_null CHECK (score IS NOT NULL) NOT VALID"
                )
            bind.exec_driver_sql("ALTER TABLE comments VALIDATE CONSTRAINT comments_score_not_null")
            bind.exec_driver_sql("ALTER TABLE comments ALTER COLUMN score SET NOT NULL")  # no scan: the check proves it
        bind.exec_driver_sql("ALTER TABLE comments DROP CONSTRAINT IF EXISTS comments_score_not_null")


def downgrade() -> None:
    op.alter_column("comments", "score", nullable=True)  # DROP NOT NULL: catalog only
