from alembic import op

revision = "r005"
down_revision = "r004"


def upgrade() -> None:
    op.execute("ALTER TABLE parts ADD COLUMN a text")


def downgrade() -> None:
    op.execute("ALTER TABLE parts DROP COLUMN a")
