"""A NOT NULL column with a volatile default: added nullable, backfilled, then NOT NULL."""

import sqlalchemy as sa
from alembic import op

revision = "n002"
down_revision = "n001"


def upgrade() -> None:
    op.add_column_online("orders", sa.Column("ref", sa.Text, nullable=False,
                                             server_default=sa.text("md5(random()::text)")))


def downgrade() -> None:
    op.drop_column_online("orders", "ref")
