from alembic import op

revision = "r006"
down_revision = "r004"


def upgrade() -> None:
    op.execute("ALTER TABLE parts ADD COLUMN b text")


def downgrade() -> None:
    op.execute("ALTER TABLE parts DROP COLUMN b")
