"""The bench's tables: items (filled by the bench, 2,000,000 rows by default) and its child orders,
whose item_id references it. Shared by both chains (their alembic.ini lists this directory)."""

from alembic import op

revision = "c000"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id bigserial PRIMARY KEY, qty integer NOT NULL, note text)")
    op.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, "
               "item_id bigint NOT NULL REFERENCES items (id), gift_item_id bigint, "
               "amount integer NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE orders")
    op.execute("DROP TABLE items")
