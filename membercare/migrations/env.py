"""Alembic environment: runs against the URL that ``membercare.db.alembic_config`` sets."""

from alembic import context
from sqlmodel import SQLModel

# Imported for their side effect: each registers its tables on SQLModel.metadata.
from membercare.db import make_engine
from membercare.errors import ConfigurationError

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise ConfigurationError("no database URL: run the migrations through membercare.db.alembic_config")
    engine = make_engine(url)
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode recreates tables safely.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
