"""the online operations, in their SQLite forms

Revision ID: s002
Revises: s001
"""

import os
import time

import sqlalchemy as sa
from alembic import op

revision = "s002"
down_revision = "s001"


def upgrade() -> None:
    op.create_index_online("ix_items_name", "items", ["name"])
    op.add_column_online("items", sa.Column("code", sa.Text, nullable=False, server_default="?"),
                         backfill="upper(name)")
    op.create_check_constraint_online("ck_items_qty", "items", "qty >= 0")
    op.set_not_null_online("items", "name")
    op.execute(f"INSERT INTO audit VALUES ('s002', {os.getpid()})")
    time.sleep(float(os.environ.get("RACE_SLEEP", "0")))


def downgrade() -> None:
    op.drop_not_null_online("items", "name")
    op.drop_constraint_online("ck_items_qty", "items")
    op.drop_column_online("items", "code")
    op.drop_index_online("ix_items_name", "items")
    op.execute("DELETE FROM audit WHERE rev = 's002'")
