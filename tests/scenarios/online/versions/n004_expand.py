"""Expand (pre-deploy): accounts.email becomes email_address, orders.amount (integer) becomes
amount_cents (bigint); both columns kept in sync until the contract revision."""

import sqlalchemy as sa
from alembic import op

revision = "n004"
down_revision = "n003"


def upgrade() -> None:
    op.rename_column_expand("accounts", "email", "email_address")
    op.alter_column_type_expand("orders", "amount", "amount_cents", sa.BigInteger(),
                                using="amount * 100", revert_using="amount_cents / 100")
    # ck_orders_amount goes with amount at the contract: its successor is ready before that
    op.create_check_constraint_online("ck_orders_amount_cents", "orders", "amount_cents >= 0")


def downgrade() -> None:
    op.drop_constraint_online("ck_orders_amount_cents", "orders")
    op.alter_column_type_expand_revert("orders", "amount", "amount_cents")
    op.rename_column_expand_revert("accounts", "email", "email_address")
