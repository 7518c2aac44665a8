from alembic import op

revision = "f001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE widgets (id int PRIMARY KEY, name text)")
    # records which application_name the migration session had: proves PGAPPNAME reached it
    op.execute("CREATE TABLE seen_app AS SELECT current_setting('application_name') AS app, "
               "current_setting('lock_timeout') AS lock_timeout")


def downgrade() -> None:
    op.execute("DROP TABLE seen_app")
    op.execute("DROP TABLE widgets")
