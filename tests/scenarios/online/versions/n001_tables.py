"""Two tables with data: the scenario of the online operations (docs/online.md)."""

from alembic import op

revision = "n001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL DEFAULT 'unknown', "
               "name text)")
    op.execute("INSERT INTO accounts SELECT g, 'user' || g || '@example.com', 'name ' || g "
               "FROM generate_series(1, 300) g")
    op.execute("CREATE TABLE orders (id bigint PRIMARY KEY, account_id bigint, "
               "amount integer NOT NULL DEFAULT 0, note text)")
    op.execute("INSERT INTO orders SELECT g, g % 300 + 1, g % 1000, 'order ' || g "
               "FROM generate_series(1, 3000) g")


def downgrade() -> None:
    op.execute("DROP TABLE orders")
    op.execute("DROP TABLE accounts")
