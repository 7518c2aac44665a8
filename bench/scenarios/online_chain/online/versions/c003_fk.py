"""orders.gift_item_id references items: NOT VALID, then VALIDATE in its own transaction."""

from alembic import op

revision = "c003"
down_revision = "c002"


def upgrade() -> None:
    op.create_foreign_key_online("fk_orders_gift_item", "orders", "items", ["gift_item_id"], ["id"])


def downgrade() -> None:
    op.drop_constraint_online("fk_orders_gift_item", "orders")
