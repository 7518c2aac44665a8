from alembic import op

revision = "b003"
down_revision = "b001"


def upgrade() -> None:
    op.execute("CREATE TABLE b003_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE b003_done")
