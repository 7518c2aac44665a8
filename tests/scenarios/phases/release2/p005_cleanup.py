from alembic import op

revision = "p005"
down_revision = "p004"
runner_phase = "post-deploy"


def upgrade() -> None:
    op.execute("CREATE TABLE p005_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE p005_done")
