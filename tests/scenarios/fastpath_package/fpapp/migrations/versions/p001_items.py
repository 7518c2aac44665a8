"""Items (idempotent: the tests replay it into other version tables)."""

from alembic import op

revision = "p001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE IF NOT EXISTS fp_items (id int PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE fp_items")
