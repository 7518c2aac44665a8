"""An index on items.qty, built CONCURRENTLY."""

from alembic import op

revision = "c002"
down_revision = "c001"


def upgrade() -> None:
    op.create_index_online("ix_items_qty", "items", ["qty"])


def downgrade() -> None:
    op.drop_index_online("ix_items_qty", "items")
