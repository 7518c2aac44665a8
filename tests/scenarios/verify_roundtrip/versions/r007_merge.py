"""Merges the two branches; its own change round-trips too."""

from alembic import op

revision = "r007"
down_revision = ("r005", "r006")


def upgrade() -> None:
    op.execute("CREATE VIEW part_names AS SELECT id, a, b FROM parts")


def downgrade() -> None:
    op.execute("DROP VIEW part_names")
