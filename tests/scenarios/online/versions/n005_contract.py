"""Contract (post-deploy, once every pod runs the code that uses the new columns)."""

import sqlalchemy as sa
from alembic import op

revision = "n005"
down_revision = "n004"
runner_phase = "post-deploy"


def upgrade() -> None:
    op.rename_column_contract("accounts", "email", "email_address")
    op.alter_column_type_contract("orders", "amount", "amount_cents", server_default=sa.text("0"))


def downgrade() -> None:
    op.alter_column_type_contract_revert("orders", "amount", "amount_cents", sa.Integer(),
                                         using="amount * 100", revert_using="amount_cents / 100",
                                         existing_server_default=sa.text("0"))
    op.create_check_constraint_online("ck_orders_amount", "orders", "amount >= 0")  # went with amount
    op.rename_column_contract_revert("accounts", "email", "email_address")
