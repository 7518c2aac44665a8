"""items.note becomes description, expand (pre-deploy): the new column and its sync trigger."""

from alembic import op

revision = "c005"
down_revision = "c004"


def upgrade() -> None:
    op.rename_column_expand("items", "note", "description")


def downgrade() -> None:
    op.rename_column_expand_revert("items", "note", "description")
