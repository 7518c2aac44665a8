"""items.ref NOT NULL with a volatile default: one ALTER TABLE, which rewrites the table."""

import sqlalchemy as sa
from alembic import op

revision = "c001"
down_revision = "c000"


def upgrade() -> None:
    op.add_column("items", sa.Column("ref", sa.Text, nullable=False,
                                     server_default=sa.text("md5(random()::text)")))


def downgrade() -> None:
    op.drop_column("items", "ref")
