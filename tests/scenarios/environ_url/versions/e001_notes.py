"""One table, created through env.py's own engine."""

from alembic import op

revision = "e001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE notes (id bigint PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE notes")
