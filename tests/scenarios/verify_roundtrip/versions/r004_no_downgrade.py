"""A downgrade that cannot run, not declared irreversible."""

from alembic import op

revision = "r004"
down_revision = "r003"


def upgrade() -> None:
    op.execute("COMMENT ON TABLE widgets IS 'things we sell'")


def downgrade() -> None:
    raise NotImplementedError
