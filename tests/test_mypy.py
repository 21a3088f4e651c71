"""mypy (pinned in requirements-dev.txt; settings and the checked packages in pyproject.toml) finds no type error
in the product packages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_nothing():
    mypy = Path(sys.executable).with_name("mypy")
    proc = subprocess.run([str(mypy), "--no-error-summary", "--no-pretty"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
