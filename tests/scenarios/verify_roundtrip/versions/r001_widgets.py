from alembic import op

revision = "r001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE widgets (id bigint PRIMARY KEY, name text, size int)")
    op.execute("CREATE TABLE legacy (id bigint PRIMARY KEY)")
    op.execute("CREATE TABLE parts (id bigint PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE parts")
    op.execute("DROP TABLE legacy")
    op.execute("DROP TABLE widgets")
