"""view of order totals per customer

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE VIEW billing.customer_totals AS
        SELECT c.id AS customer_id, c.email, count(o.id) AS orders,
               coalesce(sum(o.total_cents), 0) AS total_cents
        FROM customers c LEFT JOIN orders o ON o.customer_id = c.id
        GROUP BY c.id, c.email
    """)


def downgrade() -> None:
    op.execute("DROP VIEW billing.customer_totals")
