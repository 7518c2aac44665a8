"""Inspects the database before acting: offline mode (plain `plan`) cannot render it."""

import sqlalchemy as sa
from alembic import op

revision = "v006"
down_revision = "v005"


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("accounts")}
    if "note" not in columns:
        op.add_column("accounts", sa.Column("note", sa.Text))


def downgrade() -> None:
    op.drop_column("accounts", "note")
