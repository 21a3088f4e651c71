"""The states of a job, apart from the tables (`node.store.db`), so the CLI's parser (`jobs --state`) needs no
database code."""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    """Where a received instance is in its life; transitions are listed in `jobs.TRANSITIONS`."""

    RECEIVED = "RECEIVED"
    RUNNING = "RUNNING"
    ENCODED = "ENCODED"
    DELIVERING = "DELIVERING"
    SENT = "SENT"
    SKIPPED = "SKIPPED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    FAILED_DELIVERY = "FAILED_DELIVERY"
