"""SQLAlchemy models of the sample application: the schema the migrations build.

`alembic check` compares these with the database after `upgrade head`.
"""

import sqlalchemy as sa

metadata = sa.MetaData()
# SQLite (local development): only an INTEGER PRIMARY KEY numbers new rows; PostgreSQL gets BIGINT
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")

customers = sa.Table(
    "customers", metadata,
    sa.Column("id", ID, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("email_domain", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)

orders = sa.Table(
    "orders", metadata,
    sa.Column("id", ID, sa.Identity(), primary_key=True),
    sa.Column("customer_id", sa.BigInteger, sa.ForeignKey("customers.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("total_cents", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Index("ix_orders_customer_created", "customer_id", "created_at"),
)

invoices = sa.Table(
    "invoices", metadata,
    sa.Column("id", ID, sa.Identity(), primary_key=True),
    sa.Column("order_id", sa.BigInteger, sa.ForeignKey("orders.id"), nullable=False),
    sa.Column("amount_cents", sa.BigInteger, nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    schema="billing",
)
