from alembic import op

revision = "t003"
down_revision = "t002"


def upgrade() -> None:
    op.execute("ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free'")


def downgrade() -> None:
    op.execute("ALTER TABLE accounts DROP COLUMN plan")
