"""docker/: the Dockerfile passes hadolint, compose.yaml the compose-spec schema, each node role's command
is one the CLI takes with the settings file the compose file mounts, and the deployment is safe as shipped
(published ports, Orthanc authentication, no default passwords, TLS proxy, health check, roles). No Docker
engine runs here: the files are read, and the scp role is run with docker/node.toml."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from config.settings import SettingsError, load_settings
from node.cli import ROLES, build_parser
from node.orthanc_peer import free_port
from tests.conftest import require_binary

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
    settings = docker_settings(monkeypatch)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.web.enabled and settings.web.host == "0.0.0.0"
    assert services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"].count(str(settings.node.port)) == 1
    assert "ORTHANC" in settings.node.allowed_calling_aets


# The security invariants of the shipped deployment (issue 13).

REQUIRED = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")  # ${VAR:?message}: compose refuses to start without it


def ports_of(service: dict) -> list[tuple[str, str, str]]:
    published = []
    for port in service.get("ports", []):
        host, _, rest = port.rpartition(":")
        address, _, host_port = host.rpartition(":") if not host.startswith("${") else (
            host[:host.index("}") + 1], ":", host[host.index("}") + 2:])
        published.append((address, host_port, rest))
    return published


def docker_settings(monkeypatch, database_url: str | None = None, **overrides):
    """docker/node.toml with the environment compose gives the node (secrets replaced by dummies)."""
    for key, value in compose()["services"]["scp"]["environment"].items():
        monkeypatch.setenv(key, re.sub(r"\$\{[^}]+\}", "x" * 32, value))
    if database_url is not None:
        monkeypatch.setenv("SMARTNODULE_NODE__DATABASE_URL", database_url)
    return load_settings(DOCKER / "node.toml", **overrides)


def test_published_ports_are_bound_to_a_chosen_address_and_only_where_needed():
    services = compose()["services"]
    published = {name: ports_of(service) for name, service in services.items() if service.get("ports")}
    assert set(published) == {"orthanc", "proxy"}  # not PostgreSQL, not the node's DICOM port, not the web app
    for name, ports in published.items():
        for address, _, _ in ports:
            assert address == "127.0.0.1" or REQUIRED.match(address), f"{name}: {address!r} is every interface"
    assert ("127.0.0.1", "8042", "8042") in published["orthanc"]  # Orthanc's REST API: this host only
    assert [port for _, port, _ in published["proxy"]] == ["443"]


def test_orthanc_requires_a_password_from_a_secret():
    orthanc = compose()["services"]["orthanc"]
    environment = orthanc["environment"]
    assert environment["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert "ORTHANC__REGISTERED_USERS" not in environment and "ORTHANC__REGISTERED_USERS" in orthanc["secrets"]
    secret = compose()["secrets"]["ORTHANC__REGISTERED_USERS"]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / secret)], cwd=DOCKER.parent)
    assert ignored.returncode == 0, f"{secret} could be committed"


def test_no_password_or_key_has_a_default():
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|_KEY$", key) and not _is_a_mounted_secret(service, key, value):
                assert REQUIRED.match(value), f"{name}.{key} has a value or a default: {value!r}"
            credentials = re.search(r"://[^:/@]+:([^@]+)@", value)
            if credentials:
                assert REQUIRED.match(credentials.group(1)), f"{name}.{key}: a password in a URL"
    for path in (DOCKER / ".env", DOCKER / "secrets"):
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=DOCKER.parent).returncode == 0


def _is_a_mounted_secret(service: dict, key: str, value: str) -> bool:
    """A *_FILE setting naming a Docker secret of this service (the password is in the git-ignored file)."""
    return key.endswith("_FILE") and value.startswith("/run/secrets/") \
        and value.removeprefix("/run/secrets/") in service.get("secrets", [])


def test_the_first_administrator_comes_from_a_secret_of_the_web_role_only(monkeypatch):
    """The web role reads web.admin_password_file from a Docker secret in a git-ignored file; the other roles
    neither see the secret nor are told where it is (review_web.first_admin makes the user: its own test)."""
    services = compose()["services"]
    web = services["web"]
    path = web["environment"]["SMARTNODULE_WEB__ADMIN_PASSWORD_FILE"]
    assert path.startswith("/run/secrets/") and path.removeprefix("/run/secrets/") in web["secrets"]
    secret = compose()["secrets"][path.removeprefix("/run/secrets/")]["file"]
    assert subprocess.run(["git", "check-ignore", "-q", str(DOCKER / secret)], cwd=DOCKER.parent).returncode == 0
    for role in NODE_ROLES - {"web"}:
        assert "SMARTNODULE_WEB__ADMIN_PASSWORD_FILE" not in services[role]["environment"], role
        assert not services[role].get("secrets"), role
    assert {k: v for k, v in web["environment"].items() if k != "SMARTNODULE_WEB__ADMIN_PASSWORD_FILE"} \
        == services["scp"]["environment"]  # the rest of the node's environment, unchanged
    monkeypatch.setenv("SMARTNODULE_WEB__ADMIN_PASSWORD_FILE", path)
    with pytest.raises(SettingsError, match=f"web.admin_password_file: admin_password_file {path} does not exist"):
        docker_settings(monkeypatch)  # no such file here (outside the container): refused, naming the setting


def test_the_web_role_is_reached_through_a_tls_proxy_it_trusts(monkeypatch):
    services = compose()["services"]
    proxy = services["proxy"]
    assert proxy["image"].startswith("caddy:")
    caddyfile = (DOCKER / "Caddyfile").read_text()
    assert "tls internal" in caddyfile and "reverse_proxy web:8080" in caddyfile
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    settings = docker_settings(monkeypatch)
    assert settings.web.secure_cookies and settings.web.port == 8080
    proxy_address = ip_address(proxy["networks"]["default"]["ipv4_address"])
    assert [proxy_address in network for network in settings.web.trusted_proxies] == [True]
    assert all(network.num_addresses == 1 for network in settings.web.trusted_proxies)


def test_scp_health_check_calls_with_a_title_allowed_from_the_container_only(monkeypatch):
    settings = docker_settings(monkeypatch)
    checks = [compose()["services"]["scp"]["healthcheck"]["test"][1:],
              json.loads(re.search(r"HEALTHCHECK .* CMD (\[.*\])", (DOCKER / "Dockerfile").read_text()).group(1))]
    for command in checks:
        assert command[0] == "echoscu"
        calling, called = command[command.index("-aet") + 1], command[command.index("-aec") + 1]
        assert calling in settings.node.allowed_calling_aets and called == settings.node.ae_title
        assert settings.source(calling).hosts == ["127.0.0.1"]
        assert command[-2:] == ["127.0.0.1", str(settings.node.port)]


@pytest.mark.integration
def test_the_scp_role_passes_its_health_check_and_serves_no_web_app(monkeypatch, tmp_path, running_node):
    """The scp role with docker/node.toml (web.enabled = true there): C-ECHO as the health check does it answers,
    another title is refused, and no web server listens."""
    echoscu = require_binary("/usr/bin/echoscu")
    port, web_port = free_port(), free_port()
    settings = docker_settings(monkeypatch, f"sqlite:///{tmp_path / 'node.db'}",
                               node={"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "d")},
                               web={"port": web_port}, audit={"key_file": str(tmp_path / "audit.key")},
                               metrics={"host": "127.0.0.1", "port": free_port()})
    assert settings.web.enabled
    node = running_node(settings, **ROLES["scp"])
    command = compose()["services"]["scp"]["healthcheck"]["test"][1:]
    command = [echoscu, *command[1:-1], str(port)]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    other = [echoscu, "-aet", "SOMEONE", "-aec", "SMARTNODULE", "127.0.0.1", str(port)]
    assert subprocess.run(other, capture_output=True, timeout=60).returncode != 0
    assert node.web is None and node.alerter is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", web_port), timeout=5).close()


def test_only_the_web_role_serves_the_web_app_and_sends_alerts():
    for role in ("scp", "worker"):
        assert ROLES[role]["web"] is False and ROLES[role]["alerts"] is False, role
    web = compose()["services"]["web"]
    assert web.get("deploy", {}).get("replicas", 1) == 1  # alerts go out once


def test_the_build_context_carries_no_secrets_and_docker_no_stray_files():
    patterns = [line for line in (DOCKER.parent / ".dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "**"  # everything excluded, then what the image needs allowed back
    assert not any(p.startswith("!") and ("docker" in p or ".env" in p or "key" in p) for p in patterns)
    tracked = subprocess.run(["git", "ls-files", "docker"], cwd=DOCKER.parent, capture_output=True, text=True)
    assert not [f for f in tracked.stdout.split() if f.endswith(".whl")]
