"""An index on items.qty (CREATE INDEX: writes wait for the build)."""

from alembic import op

revision = "c002"
down_revision = "c001"


def upgrade() -> None:
    op.create_index("ix_items_qty", "items", ["qty"])


def downgrade() -> None:
    op.drop_index("ix_items_qty", "items")
