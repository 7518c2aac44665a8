"""Tries to run a program on the database server."""

import os

from alembic import op

revision = "x002"
down_revision = "x001"


def upgrade() -> None:
    op.execute(f"COPY (SELECT 1) TO PROGRAM 'touch {os.environ['HOSTILE_MARKER']}'")


def downgrade() -> None:
    pass
