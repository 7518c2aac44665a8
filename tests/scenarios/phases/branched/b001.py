from alembic import op

revision = "b001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE b001_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE b001_done")
