"""Commands that need no model do not import torch: `check-config`, `jobs`, `resend`, `user` (issue #14).

Each runs in a fresh interpreter (`node.cli.main`), which then reports whether torch, timm or mlflow were loaded.
The wall time of `check-config` is measured by hand (README, "The layers"), not asserted here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.node.test_cli_audit import config  # noqa: F401  (fixture)

PROBE = """
import json, sys
from node.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
print(json.dumps({"status": status, "loaded": sorted(m for m in ("torch", "timm", "mlflow") if m in sys.modules)}))
"""


@pytest.mark.parametrize("args, status", [
    (["check-config", "{config}"], 0),
    (["jobs", "--config", "{config}"], 0),
    (["resend", "1", "--config", "{config}"], 2),  # no such job: an error, still without the model
    (["user", "list", "--config", "{config}"], 0),
])
def test_command_does_not_import_torch(config, args, status):  # noqa: F811  (fixture imported above)
    argv = [a.format(config=config) for a in args]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == status, proc.stderr
    assert report["loaded"] == [], f"{args[0]} imported {report['loaded']}"
