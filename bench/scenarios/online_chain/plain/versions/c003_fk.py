"""orders.gift_item_id references items (validated under lock)."""

from alembic import op

revision = "c003"
down_revision = "c002"


def upgrade() -> None:
    op.create_foreign_key("fk_orders_gift_item", "orders", "items", ["gift_item_id"], ["id"])


def downgrade() -> None:
    op.drop_constraint("fk_orders_gift_item", "orders", type_="foreignkey")
