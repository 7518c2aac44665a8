"""Add a column to items."""

from alembic import op

revision = "v002"
down_revision = "v001"


def upgrade() -> None:
    op.execute("ALTER TABLE items ADD COLUMN note text")


def downgrade() -> None:
    op.execute("ALTER TABLE items DROP COLUMN note")
