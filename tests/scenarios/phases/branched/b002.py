from alembic import op

revision = "b002"
down_revision = "b001"
runner_phase = "post-deploy"


def upgrade() -> None:
    op.execute("CREATE TABLE b002_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE b002_done")
