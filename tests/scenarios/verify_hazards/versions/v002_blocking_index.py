"""An index on an existing table built without CONCURRENTLY: blocks writes while it builds."""

from alembic import op

revision = "v002"
down_revision = "v001"


def upgrade() -> None:
    op.create_index("ix_accounts_plan", "accounts", ["plan"])


def downgrade() -> None:
    op.drop_index("ix_accounts_plan", "accounts")
