"""Two tables: accounts (big in the tests' live database) and tiny (empty there; no index, no
default: the drift check prints no definition of it, so nothing of --against locks it)."""

import sqlalchemy as sa
from alembic import op

revision = "h001"
down_revision = None


def upgrade() -> None:
    op.create_table("accounts", sa.Column("id", sa.BigInteger, primary_key=True), sa.Column("email", sa.Text),
                    sa.Column("amount", sa.Integer), sa.Column("points", sa.Integer))
    op.create_table("tiny", sa.Column("id", sa.BigInteger), sa.Column("v", sa.Integer))


def downgrade() -> None:
    op.drop_table("tiny")
    op.drop_table("accounts")
