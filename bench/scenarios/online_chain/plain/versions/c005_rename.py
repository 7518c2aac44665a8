"""items.note becomes description: a plain RENAME (code still reading note fails from here on)."""

from alembic import op

revision = "c005"
down_revision = "c004"


def upgrade() -> None:
    op.alter_column("items", "note", new_column_name="description")


def downgrade() -> None:
    op.alter_column("items", "description", new_column_name="note")
