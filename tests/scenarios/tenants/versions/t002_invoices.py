"""TENANT_SLEEP=N: pg_sleep(N) inside this revision's transaction (signal tests)."""

import os

from alembic import op

revision = "t002"
down_revision = "t001"


def upgrade() -> None:
    op.execute("CREATE TABLE invoices (id bigint PRIMARY KEY, "
               "account_id bigint NOT NULL REFERENCES accounts (id), amount_cents bigint NOT NULL)")
    op.execute(f"SELECT pg_sleep({float(os.environ.get('TENANT_SLEEP', '0'))})")


def downgrade() -> None:
    op.execute("DROP TABLE invoices")
