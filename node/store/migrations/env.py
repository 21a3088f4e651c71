"""Alembic environment: the node's schema (jobs, deliveries, review tables) on SQLite or PostgreSQL.

`node.store.db.open_database` runs the migrations with the connection it already has;
`alembic -c node/store/migrations/alembic.ini` works too for administrators.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from node.store import review as _review_models  # noqa: F401  (registers the review tables on Base)
from node.store import runs as _scheduler_models  # noqa: F401  (scheduler_runs, APScheduler's job store)
from node.store.db import Base

target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = engine_from_config(context.config.get_section(context.config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        run_migrations(connection)
