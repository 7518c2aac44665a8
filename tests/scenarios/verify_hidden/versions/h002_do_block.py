"""Column type changes inside a DO block: Squawk sees `DO $$ ... $$`, PostgreSQL rewrites both tables."""

from alembic import op

revision = "h002"
down_revision = "h001"


def upgrade() -> None:
    op.execute("""
        DO $$
        BEGIN
            EXECUTE 'ALTER TABLE accounts ALTER COLUMN amount TYPE bigint';
            EXECUTE 'ALTER TABLE tiny ALTER COLUMN v TYPE bigint';
        END
        $$
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE tiny ALTER COLUMN v TYPE integer")
    op.execute("ALTER TABLE accounts ALTER COLUMN amount TYPE integer")
