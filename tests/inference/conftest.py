"""Fixtures of the inference tests: a writable copy of the shipped model card."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inference.model_card import load_card
from inference.predictor import DEFAULT_CARD


@pytest.fixture
def card_copy(tmp_path: Path) -> Path:
    """The shipped card with its weights and companion files, copied into `tmp_path` (tools may rewrite it)."""
    shipped = load_card(DEFAULT_CARD)
    for name in ("card.json", shipped.weights_file, *shipped.companion_files):
        shutil.copy(DEFAULT_CARD.parent / name, tmp_path / name)
    return tmp_path / "card.json"
