"""items.ref: NOT NULL, existing rows backfilled in batches, new rows from a volatile default."""

import sqlalchemy as sa
from alembic import op

revision = "c001"
down_revision = "c000"


def upgrade() -> None:
    op.add_column_online("items", sa.Column("ref", sa.Text, nullable=False,
                                            server_default=sa.text("md5(random()::text)")),
                         backfill="md5(id::text)")


def downgrade() -> None:
    op.drop_column_online("items", "ref")
