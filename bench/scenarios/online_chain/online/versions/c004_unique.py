"""items.ref unique: a unique index built CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX."""

from alembic import op

revision = "c004"
down_revision = "c003"


def upgrade() -> None:
    op.create_unique_constraint_online("uq_items_ref", "items", ["ref"])


def downgrade() -> None:
    op.drop_constraint_online("uq_items_ref", "items")
