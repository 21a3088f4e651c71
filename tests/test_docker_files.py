"""docker/: the Dockerfile passes hadolint, compose.yaml the compose-spec schema, and each node role's command
is one the CLI takes with the settings file the compose file mounts (no Docker engine runs here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from config.settings import load_settings
from node.cli import build_parser

DOCKER = Path(__file__).resolve().parents[1] / "docker"
BIN = Path(sys.executable).parent  # hadolint and check-jsonschema come with requirements-dev.txt
NODE_ROLES = {"scp", "worker", "web", "scheduler"}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_dockerfile_passes_hadolint():
    done = subprocess.run([BIN / "hadolint", "--no-color", "--failure-threshold", "style", DOCKER / "Dockerfile"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_spec():
    done = subprocess.run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                           DOCKER / "compose.yaml"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_node_role_runs_a_cli_command_with_the_mounted_settings(monkeypatch):
    services = compose()["services"]
    node_services = {name: s for name, s in services.items() if s.get("image") == "smartnodule:latest"}
    assert set(node_services) == NODE_ROLES
    parser = build_parser()
    for name, service in node_services.items():
        command = service["command"]
        assert command[0] == name
        args = parser.parse_args(command)
        mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert str(args.config) in mounted, f"{name}: --config {args.config} is not mounted"
        assert (DOCKER / mounted[str(args.config)]).resolve() == DOCKER / "node.toml"
    for key, value in node_services["scp"]["environment"].items():
        monkeypatch.setenv(key, value if not value.startswith("${") else "x" * 32)
    settings = load_settings(DOCKER / "node.toml")
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.web.enabled and settings.web.host == "0.0.0.0"
    assert services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"].count(str(settings.node.port)) == 1
    assert "ORTHANC" in settings.node.allowed_calling_aets
