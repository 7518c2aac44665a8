"""Notes on items."""

from alembic import op

revision = "p002"
down_revision = "p001"


def upgrade() -> None:
    op.execute("CREATE TABLE IF NOT EXISTS fp_notes (id int PRIMARY KEY, item int)")


def downgrade() -> None:
    op.execute("DROP TABLE fp_notes")
