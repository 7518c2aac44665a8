revision = "h002"
down_revision = 'h001'


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
