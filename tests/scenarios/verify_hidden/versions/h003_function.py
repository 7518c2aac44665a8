"""A column type change inside a PL/pgSQL function the revision calls (of the table that is
empty in the tests' live database)."""

from alembic import op

revision = "h003"
down_revision = "h002"


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION widen_id() RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            ALTER TABLE tiny ALTER COLUMN id TYPE numeric;
        END
        $$
    """)
    op.execute("SELECT widen_id()")
    op.execute("DROP FUNCTION widen_id()")


def downgrade() -> None:
    op.execute("ALTER TABLE tiny ALTER COLUMN id TYPE bigint")
