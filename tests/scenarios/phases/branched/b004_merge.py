"""The merge of both branches: post-deploy, since it descends from b002 (B004_PHASE overrides)."""

import os

from alembic import op

revision = "b004"
down_revision = ("b002", "b003")
runner_phase = os.environ.get("B004_PHASE", "post-deploy")


def upgrade() -> None:
    op.execute("CREATE TABLE b004_done (x int)")


def downgrade() -> None:
    op.execute("DROP TABLE b004_done")
