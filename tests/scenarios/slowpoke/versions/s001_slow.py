"""Create a table, then sleep SLOWPOKE_SLEEP seconds in the same transaction (default 0)."""

import os

from alembic import op

revision = "s001"
down_revision = None


def upgrade() -> None:
    op.execute("CREATE TABLE slowpoke (id int PRIMARY KEY)")
    op.execute(f"SELECT pg_sleep({float(os.environ.get('SLOWPOKE_SLEEP', '0'))})")


def downgrade() -> None:
    op.execute("DROP TABLE slowpoke")
