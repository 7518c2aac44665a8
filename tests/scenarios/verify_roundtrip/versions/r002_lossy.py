"""Lossy: the downgrade forgets the index the upgrade built."""

from alembic import op

revision = "r002"
down_revision = "r001"


def upgrade() -> None:
    op.execute("ALTER TABLE widgets ADD COLUMN weight int")
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix_widgets_name ON widgets (name)")


def downgrade() -> None:
    op.execute("ALTER TABLE widgets DROP COLUMN weight")
