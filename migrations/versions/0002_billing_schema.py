"""billing schema with invoices

Revision ID: 0002
Revises: 0001

SQLite (local development, docs/sqlite.md) has no schemas: there the billing tables live in the
database file itself (one file, one backup), and env.py's models say the same.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# SQLite: only an INTEGER PRIMARY KEY numbers new rows; PostgreSQL gets BIGINT
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def schemas() -> tuple[str | None, str]:
    """(billing's schema, the orders table's): none on SQLite."""
    if op.get_context().dialect.name == "sqlite":
        return None, ""
    return "billing", "public."


def upgrade() -> None:
    billing, public = schemas()
    if billing:
        op.execute("CREATE SCHEMA billing")
    op.create_table(
        "invoices",
        sa.Column("id", ID, sa.Identity(), primary_key=True),
        sa.Column("order_id", sa.BigInteger, sa.ForeignKey(f"{public}orders.id"), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        schema=billing,
    )


def downgrade() -> None:
    billing, _ = schemas()
    op.drop_table("invoices", schema=billing)
    if billing:
        op.execute("DROP SCHEMA billing")
