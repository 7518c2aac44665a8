"""items, a view of them (batch mode must still rename its copy of the table), and an audit table
each revision writes to when it runs (the race test counts them)

Revision ID: s001
"""

import os
import time

import sqlalchemy as sa
from alembic import op

revision = "s001"
down_revision = None


def upgrade() -> None:
    op.create_table("audit", sa.Column("rev", sa.Text, nullable=False), sa.Column("pid", sa.Integer))
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.Text), sa.Column("qty", sa.Integer, nullable=False))
    op.execute("INSERT INTO items (name, qty) VALUES ('apple', 1), ('pear', 2), ('plum', 0)")
    op.execute("CREATE VIEW item_names AS SELECT name FROM items")
    op.execute(f"INSERT INTO audit VALUES ('s001', {os.getpid()})")
    time.sleep(float(os.environ.get("RACE_SLEEP", "0")))  # widens the race window


def downgrade() -> None:
    op.execute("DROP VIEW item_names")
    op.drop_table("items")
    op.drop_table("audit")
