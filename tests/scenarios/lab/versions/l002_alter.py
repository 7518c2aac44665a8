"""Behaviour chosen by LAB_MODE: 'ok', 'fail', 'sleep' (pg_sleep(LAB_SLEEP) first)."""

import os

from alembic import op

revision = "l002"
down_revision = "l001"


def upgrade() -> None:
    mode = os.environ.get("LAB_MODE", "ok")
    op.execute("ALTER TABLE items ADD COLUMN flag boolean")
    if mode == "sleep":
        op.execute(f"SELECT pg_sleep({float(os.environ.get('LAB_SLEEP', '30'))})")
    if mode == "fail":
        op.execute("INSERT INTO items (id) VALUES (1)")  # duplicate key
    op.execute("CREATE TABLE l002_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE l002_done")
    op.execute("ALTER TABLE items DROP COLUMN flag")
