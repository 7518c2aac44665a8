"""items.ref unique (ADD CONSTRAINT UNIQUE: the index is built under ACCESS EXCLUSIVE)."""

from alembic import op

revision = "c004"
down_revision = "c003"


def upgrade() -> None:
    op.create_unique_constraint("uq_items_ref", "items", ["ref"])


def downgrade() -> None:
    op.drop_constraint("uq_items_ref", "items", type_="unique")
