"""Record the session this revision ran in: the runner's settings must reach it."""

from alembic import op

revision = "c001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE cookbook_seen AS SELECT current_setting('application_name') AS app, "
               "current_setting('lock_timeout') AS lock_timeout")


def downgrade() -> None:
    op.execute("DROP TABLE cookbook_seen")
