from alembic import op

revision = "t001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO accounts VALUES (1, 'first')")


def downgrade() -> None:
    op.execute("DROP TABLE accounts")
