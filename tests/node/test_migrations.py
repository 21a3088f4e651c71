"""The schema comes from Alembic migrations, on SQLite and PostgreSQL alike, and matches the models."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from node.store.db import MIGRATIONS, Base, open_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return request.getfixturevalue("postgres_url")


def test_empty_database_is_migrated_to_head_and_matches_the_models(database_url):
    sessions = open_database(database_url)
    open_database(database_url)  # a second start finds nothing to do
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with sessions.kw["bind"].connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []
