"""what the tests switch on: a failure after a CREATE TABLE, a statement that never ends, an
expand/contract operation

Revision ID: s003
Revises: s002
"""

import os

from alembic import op

revision = "s003"
down_revision = "s002"


def upgrade() -> None:
    op.execute(f"INSERT INTO audit VALUES ('s003', {os.getpid()})")
    if os.environ.get("SQLITE_TEST") == "fail":
        op.execute("CREATE TABLE half_done (x INTEGER)")
        op.execute("SELECT no_such_function()")
    if os.environ.get("SQLITE_TEST") == "slow":
        op.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                   "SELECT count(*) FROM c")
    if os.environ.get("SQLITE_TEST") == "expand":
        op.rename_column_expand("items", "name", "title")


def downgrade() -> None:
    op.execute("DELETE FROM audit WHERE rev = 's003'")
