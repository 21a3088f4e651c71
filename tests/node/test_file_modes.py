"""What the node writes is private: the data folder and its folders 0750, files 0640, the SQLite database 0600,
whatever umask the node was started with."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

from config.settings import load_settings
from node.store.db import open_database


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_folder_is_private(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\naccept_any_calling_ae = true\n')
    done = subprocess.run([sys.executable, "-m", "node.cli", "user", "add", "rita", "--role", "reviewer",
                           "--config", str(config), "--password-stdin"], input="a long enough password\n",
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022), timeout=120)
    assert done.returncode == 0, done.stderr
    assert mode(data) == 0o750 and mode(data / "logs") == 0o750
    assert mode(data / "logs" / "audit.jsonl") == 0o640 and mode(data / "logs" / "audit.jsonl.checkpoint") == 0o640
    assert mode(data / "smartnodule.db") == 0o600
    assert mode(tmp_path / "data.audit-key") == 0o600


def test_an_existing_database_file_is_narrowed_to_0600(tmp_path):
    database = tmp_path / "smartnodule.db"
    database.touch(mode=0o644)
    database.chmod(0o644)
    settings = load_settings(None, node={"data_dir": str(tmp_path), "accept_any_calling_ae": True})
    open_database(settings.database_url)
    assert mode(database) == 0o600
