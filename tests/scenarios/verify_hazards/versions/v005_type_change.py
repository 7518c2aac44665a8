"""A column type change on an existing table: rewrites it under ACCESS EXCLUSIVE."""

import sqlalchemy as sa
from alembic import op

revision = "v005"
down_revision = "v004"


def upgrade() -> None:
    op.alter_column("accounts", "id", type_=sa.Numeric(20), existing_type=sa.BigInteger)


def downgrade() -> None:
    op.alter_column("accounts", "id", type_=sa.BigInteger, existing_type=sa.Numeric(20))
