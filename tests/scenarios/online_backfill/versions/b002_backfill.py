"""A backfill with no WHERE: a row updated twice would show hits = 2."""

from alembic import op

revision = "b002"
down_revision = "b001"


def upgrade() -> None:
    op.backfill("items", {"hits": "hits + 1"})


def downgrade() -> None:
    op.execute("UPDATE items SET hits = 0")
