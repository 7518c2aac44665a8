"""Expand: the new column, filled from the old one. With PHASES_LEAVE_BACKFILL=1 it also leaves a
backfill unfinished in the runner's state table, as a backfill stopped half-way would."""

import os

from alembic import op

from runner.online import state

revision = "p002"
down_revision = "p001"


def upgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN full_name text")
    op.execute("UPDATE users SET full_name = name")
    if os.environ.get("PHASES_LEAVE_BACKFILL") == "1":
        state.ensure(op.get_bind(), None)
        op.execute("INSERT INTO runner_backfills (name, revision, relation, key_column, assignment, "
                   "rows_done, state) VALUES ('users_full_name', 'p002', 'users', 'id', "
                   "'full_name = name', 10, 'running')")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN full_name")
