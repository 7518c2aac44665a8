from alembic import op

revision = "p001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE users (id int PRIMARY KEY, name text)")
    op.execute("INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 20) g")


def downgrade() -> None:
    op.execute("DROP TABLE users")
