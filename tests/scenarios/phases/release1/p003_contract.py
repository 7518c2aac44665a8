"""Contract: the old column goes once every pod reads the new one."""

from alembic import op

revision = "p003"
down_revision = "p002"
runner_phase = "post-deploy"


def upgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN name")


def downgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN name text")
    op.execute("UPDATE users SET name = full_name")
