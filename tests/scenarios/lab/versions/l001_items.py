from alembic import op

revision = "l001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
    op.execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 100) g")


def downgrade() -> None:
    op.execute("DROP TABLE items")
