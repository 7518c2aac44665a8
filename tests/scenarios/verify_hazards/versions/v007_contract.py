"""A contract step: drops a column no release reads any more, allowed with a reason."""

import sqlalchemy as sa
from alembic import op

revision = "v007"
down_revision = "v006"
runner_allow = {"ban-drop-column": "contract step: no release reads accounts.legacy since 2.3"}


def upgrade() -> None:
    op.drop_column("accounts", "legacy")


def downgrade() -> None:
    op.add_column("accounts", sa.Column("legacy", sa.Text))
