"""VERIFY_SETUP for this chain: what the application creates before running Alembic."""

import sqlalchemy as sa

metadata = sa.MetaData()
sa.Table("legacy", metadata, sa.Column("id", sa.BigInteger, primary_key=True), sa.Column("name", sa.Text))


def setup(connection: sa.Connection) -> None:
    metadata.create_all(connection)
