"""data migration: customers.email_domain, filled from email without blocking the table

Revision ID: 0005
Revises: 0004

The safe way to add a column and fill it on a table in use (docs/online.md): op.add_column_online
adds it nullable (an instant ACCESS EXCLUSIVE, under the lock_timeout schedule), then fills the
existing rows in short keyset batches, each its own transaction outside the revision's, resumable
after a crash. The same UPDATE in the revision's transaction would hold ADD COLUMN's ACCESS
EXCLUSIVE while it read and rewrote every customer (`verify` reports that as scan-under-lock).
Rows the previous release inserts during the rollout get their domain from the new code.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column_online("customers", sa.Column("email_domain", sa.Text, nullable=True),
                         backfill="lower(split_part(email, '@', 2))")


def downgrade() -> None:
    op.drop_column_online("customers", "email_domain")
