"""items.note becomes description, contract (post-deploy, once no code reads note)."""

from alembic import op

revision = "c006"
down_revision = "c005"
runner_phase = "post-deploy"


def upgrade() -> None:
    op.rename_column_contract("items", "note", "description")


def downgrade() -> None:
    op.rename_column_contract_revert("items", "note", "description")
