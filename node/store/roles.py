"""The roles of web users, apart from the tables (`node.store.review`), so the CLI's parser needs no database code."""
from __future__ import annotations

import enum


class Role(str, enum.Enum):
    REVIEWER = "reviewer"
    ADJUDICATOR = "adjudicator"
    ADMIN = "admin"
