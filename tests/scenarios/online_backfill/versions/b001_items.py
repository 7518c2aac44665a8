"""A table whose backfill counts how often each row was updated (exactly once, crash or not)."""

from alembic import op

revision = "b001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id bigint PRIMARY KEY, hits integer NOT NULL DEFAULT 0)")
    op.execute("INSERT INTO items (id) SELECT g FROM generate_series(1, 20000) g")


def downgrade() -> None:
    op.execute("DROP TABLE items")
