"""Alters a table the application creates before Alembic runs, and uses an untrusted extension."""

import sqlalchemy as sa
from alembic import op

revision = "t001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS bloom")  # superuser only: VERIFY_EXTENSIONS makes it
    op.add_column("legacy", sa.Column("note", sa.Text))
    op.create_table("tags", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))
    op.execute("CREATE INDEX ix_tags_bloom ON tags USING bloom (id)")


def downgrade() -> None:
    op.drop_table("tags")
    op.drop_column("legacy", "note")
