"""Takes the runner's connection; declares models (target_metadata) that drifted from the chain."""

import sqlalchemy as sa
from alembic import context

metadata = sa.MetaData()
sa.Table("widgets", metadata,
         sa.Column("id", sa.BigInteger, primary_key=True),
         sa.Column("name", sa.String(50)),  # the migrations make it text
         sa.Column("weight", sa.Integer),
         sa.Column("colour", sa.Text),  # the migrations never add it
         sa.Index("ix_widgets_name", "name"))
sa.Table("parts", metadata, sa.Column("id", sa.BigInteger, primary_key=True),
         sa.Column("a", sa.Text), sa.Column("b", sa.Text))

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata,
                  compare_type=True, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
