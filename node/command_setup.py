"""What a CLI command that acts on a node's data opens first: settings, the database, then logging.

Only the long-running roles (and `user add`, the first step of a new node) create a missing database; every other
command refuses to start without the node's database (`DatabaseUnavailable`, one line naming node.data_dir and
node.database_url) instead of leaving an empty one in whatever folder it was run from. The database is opened
before logging is configured, so a refused command writes nothing, not even a log folder.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import sessionmaker

from config.settings import Settings, load_settings
from node.audit import configure_logging
from node.store.db import open_database


def open_for_command(config: Path | None, *, create: bool = False) -> tuple[Settings, sessionmaker]:
    """Settings from `config`, the node's database (created when `create`), and logging to the node's audit file."""
    settings = load_settings(config)
    if create:  # the SQLite file's folder
        settings.node.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    sessions = open_database(settings.database_url, must_exist=not create)
    settings.node.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)  # the logs' folder, also with PostgreSQL
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    return settings, sessions
