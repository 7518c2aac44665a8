"""A new table: its index, volatile default and NOT NULL are no hazard (nobody uses it yet)."""

import sqlalchemy as sa
from alembic import op

revision = "v001"
down_revision = None


def upgrade() -> None:
    op.create_table("accounts", sa.Column("id", sa.BigInteger, primary_key=True),
                    sa.Column("email", sa.Text), sa.Column("plan", sa.Text), sa.Column("legacy", sa.Text))
    op.create_index("ix_accounts_email", "accounts", ["email"])
    op.add_column("accounts", sa.Column("token", sa.Uuid, server_default=sa.text("gen_random_uuid()")))
    op.alter_column("accounts", "plan", nullable=False)


def downgrade() -> None:
    op.drop_table("accounts")
