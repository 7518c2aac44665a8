"""A table with rows."""

from alembic import op

revision = "x001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text)")
    op.execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 3000) g")


def downgrade() -> None:
    op.execute("DROP TABLE items")
