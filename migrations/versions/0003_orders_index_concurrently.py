"""index orders by customer, built CONCURRENTLY

CONCURRENTLY cannot run in a transaction: it sits alone in its revision, inside
autocommit_block(), so a retry re-runs nothing else.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index("ix_orders_customer_created", "orders", ["customer_id", "created_at"],
                        postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_orders_customer_created", "orders", postgresql_concurrently=True)
