from alembic import op

revision = "p004"
down_revision = "p003"


def upgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN email text")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN email")
