"""SET NOT NULL on an existing table: scans it under ACCESS EXCLUSIVE."""

from alembic import op

revision = "v004"
down_revision = "v003"


def upgrade() -> None:
    op.alter_column("accounts", "email", nullable=False)


def downgrade() -> None:
    op.alter_column("accounts", "email", nullable=True)
