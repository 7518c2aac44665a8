revision = "h001"
down_revision = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
