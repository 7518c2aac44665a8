"""A rewrite outside a transaction (autocommit_block): no commit to observe, so its lock is sampled
from a second connection while the statement runs (it holds it for a while: the sample sees it)."""

from alembic import op

revision = "h004"
down_revision = "h003"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("""
            DO $$
            BEGIN
                EXECUTE 'ALTER TABLE accounts ALTER COLUMN points TYPE bigint';
                PERFORM pg_sleep(0.3);
            END
            $$
        """)


def downgrade() -> None:
    op.execute("ALTER TABLE accounts ALTER COLUMN points TYPE integer")
