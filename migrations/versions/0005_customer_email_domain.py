"""data migration: customers.email_domain backfilled from email

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("customers", sa.Column("email_domain", sa.Text, nullable=True))
    op.execute("UPDATE customers SET email_domain = lower(split_part(email, '@', 2))")


def downgrade() -> None:
    op.drop_column("customers", "email_domain")
