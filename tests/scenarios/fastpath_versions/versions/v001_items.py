"""Create the items table."""

from alembic import op

revision = "v001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id int PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE items")
