"""A volatile default on an existing table: rewrites it under ACCESS EXCLUSIVE."""

import sqlalchemy as sa
from alembic import op

revision = "v003"
down_revision = "v002"


def upgrade() -> None:
    op.add_column("accounts", sa.Column("ref", sa.Uuid, server_default=sa.text("gen_random_uuid()")))


def downgrade() -> None:
    op.drop_column("accounts", "ref")
