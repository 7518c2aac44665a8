"""An index, a foreign key, a check, a unique constraint and NOT NULL, each without blocking."""

from alembic import op

revision = "n003"
down_revision = "n002"


def upgrade() -> None:
    op.create_index_online("ix_orders_account", "orders", ["account_id"])
    op.create_foreign_key_online("fk_orders_account", "orders", "accounts", ["account_id"], ["id"])
    op.create_check_constraint_online("ck_orders_amount", "orders", "amount >= 0")
    op.create_unique_constraint_online("uq_orders_ref", "orders", ["ref"])
    op.set_not_null_online("orders", "account_id")


def downgrade() -> None:
    op.drop_not_null_online("orders", "account_id")
    op.drop_constraint_online("uq_orders_ref", "orders")
    op.drop_constraint_online("ck_orders_amount", "orders")
    op.drop_constraint_online("fk_orders_account", "orders")
    op.drop_index_online("ix_orders_account", "orders")
