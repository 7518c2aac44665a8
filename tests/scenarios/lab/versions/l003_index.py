"""CREATE INDEX CONCURRENTLY alone in its revision, in autocommit_block()."""

from alembic import op

revision = "l003"
down_revision = "l002"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix_items_note ON items (note)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY ix_items_note")
