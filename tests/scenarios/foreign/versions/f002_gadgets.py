from alembic import op

revision = "f002"
down_revision = "f001"


def upgrade() -> None:
    op.execute("CREATE TABLE gadgets (id int PRIMARY KEY, widget_id int REFERENCES widgets(id))")


def downgrade() -> None:
    op.execute("DROP TABLE gadgets")
