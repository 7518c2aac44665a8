"""Online operations over asyncpg's connection: an index, and a NOT NULL column backfilled."""

import sqlalchemy as sa
from alembic import op

revision = "x002"
down_revision = "x001"


def upgrade() -> None:
    op.create_index_online("ix_items_name", "items", ["name"])
    op.add_column_online("items", sa.Column("code", sa.Text, nullable=False, server_default="-"),
                         backfill="upper(name)")


def downgrade() -> None:
    op.drop_column_online("items", "code")
    op.drop_index_online("ix_items_name", "items")
