"""Declared irreversible: reported, not failed."""

from alembic import op

revision = "r003"
down_revision = "r002"
runner_irreversible = "drops the legacy table with its rows; restore it from a backup instead"


def upgrade() -> None:
    op.execute("DROP TABLE legacy")


def downgrade() -> None:
    raise NotImplementedError("legacy is gone")
