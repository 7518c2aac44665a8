"""view of order totals per customer

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def schema() -> str:
    """SQLite has no schemas: env.py maps billing into the database file, and raw SQL says so."""
    return "" if op.get_context().dialect.name == "sqlite" else "billing."


def upgrade() -> None:
    op.execute(f"""
        CREATE VIEW {schema()}customer_totals AS
        SELECT c.id AS customer_id, c.email, count(o.id) AS orders,
               coalesce(sum(o.total_cents), 0) AS total_cents
        FROM customers c LEFT JOIN orders o ON o.customer_id = c.id
        GROUP BY c.id, c.email
    """)


def downgrade() -> None:
    op.execute(f"DROP VIEW {schema()}customer_totals")
