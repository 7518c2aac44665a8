"""Behaviour chosen by LAB_MODE: 'ok', 'fail', 'sleep' (pg_sleep(LAB_SLEEP) first), 'hold'
(polls until the test releases advisory lock LAB_HOLD_KEY: as long as the test needs, however
slow the machine; polled, so the migration's lock_timeout never cuts the wait)."""

import os

from alembic import op

revision = "l002"
down_revision = "l001"


def upgrade() -> None:
    mode = os.environ.get("LAB_MODE", "ok")
    op.execute("ALTER TABLE items ADD COLUMN flag boolean")
    if mode == "sleep":
        op.execute(f"SELECT pg_sleep({float(os.environ.get('LAB_SLEEP', '30'))})")
    if mode == "hold":
        key = int(os.environ["LAB_HOLD_KEY"])
        op.execute(f"DO $$ BEGIN WHILE NOT pg_try_advisory_lock_shared({key}) LOOP "
                   f"PERFORM pg_sleep(0.05); END LOOP; PERFORM pg_advisory_unlock_shared({key}); END $$")
    if mode == "fail":
        op.execute("INSERT INTO items (id) VALUES (1)")  # duplicate key
    op.execute("CREATE TABLE l002_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE l002_done")
    op.execute("ALTER TABLE items DROP COLUMN flag")
