"""Replays issue 13's attacks on loopback against a real `smartnodule web` process and prints what each gets now.

    .venv/bin/python -m bench.security_probe

Not a timing: each line is an attack and the node's answer (HTTP status, exit status, bytes, file mode).
"""
from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from node.orthanc_peer import free_port

PASSWORD = "correct horse battery staple"


def cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def login(client: httpx.Client, username: str, password: str = PASSWORD, **headers) -> int:
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                       headers=headers).status_code


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="smartnodule-probe-"))
    data, port = work / "data", free_port()
    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\naccept_any_calling_ae = true\n'
                      f'[web]\nenabled = true\nport = {port}\nsecret_key = "{"k" * 48}"\n')
    for name, role in (("rev1", "reviewer"), ("adm1", "admin")):
        assert cli(config, "user", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    server = subprocess.Popen([sys.executable, "-m", "node.cli", "web", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        rows = probe_web(base, data)
    finally:
        server.terminate()
        server.wait(30)
    rows += probe_files(config, data)
    for what, outcome in rows:
        print(f"{what:<72} {outcome}")
    print(json.dumps(dict(rows)))


def probe_web(base: str, data: Path) -> list[tuple[str, str]]:
    rows = []
    browser = httpx.Client(base_url=base)
    login(browser, "rev1")
    thief = httpx.Client(base_url=base, cookies={"smartnodule_session": browser.cookies["smartnodule_session"]})
    before = thief.get("/queue").status_code
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/queue").text).group(1)
    browser.post("/logout", data={"csrf_token": csrf})
    rows.append(("cookie copied before logout: GET /queue before / after logout",
                 f"{before} / {thief.get('/queue').status_code}"))

    attacker = httpx.Client(base_url=base)
    wrong = [login(attacker, "adm1", "wrong password!!", **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(5)]
    rows.append(("adm1: 5 wrong passwords, each with a new forged X-Forwarded-For", " ".join(map(str, wrong))))
    rows.append(("adm1: right password with yet another forged X-Forwarded-For",
                 str(login(attacker, "adm1", **{"X-Forwarded-For": "198.51.100.1"}))))
    spray = [login(httpx.Client(base_url=base), f"user{i}", "Winter2026!!") for i in range(25)]
    rows.append(("one password across 25 usernames from one address: answers 401 / 429",
                 f"{spray.count(401)} / {spray.count(429)}"))

    audit = data / "logs" / "audit.jsonl"
    size = audit.stat().st_size
    flood = httpx.Client(base_url=base)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', flood.get("/login").text).group(1)
    statuses = [flood.post("/login", data={"username": "x" * n, "password": "p" * 16, "csrf_token": csrf}).status_code
                for n in (1 << 19, 1 << 20)]
    rows.append(("0.5 MB and 1 MB usernames: statuses, audit.jsonl growth in bytes",
                 f"{statuses[0]} {statuses[1]}, {audit.stat().st_size - size}"))
    return rows


def _relinked(lines: list[str]) -> list[str]:
    """`lines` with 11 removed from the middle and every link recomputed as plain SHA-256 (no key)."""
    import hashlib

    previous, out = "0" * 64, []
    for seq, line in enumerate(lines[:2] + lines[13:], start=1):
        signed = re.sub(r', "seq": \d+, "chain": "[0-9a-f]{64}"}$', f', "seq": {seq}}}', line)
        previous = hashlib.sha256((previous + signed).encode()).hexdigest()
        out.append(f'{signed[:-1]}, "chain": "{previous}"}}')
    return out


def probe_files(config: Path, data: Path) -> list[tuple[str, str]]:
    """After the server stopped (its last checkpoint written): forged audit logs, file modes."""
    rows = []
    audit = data / "logs" / "audit.jsonl"
    lines = audit.read_text().splitlines()
    key = data.parent / f"{data.name}.audit-key"
    forgeries = {
        "every link stripped": [re.sub(r', "seq": \d+, "chain": "[0-9a-f]{64}"}$', "}", line) for line in lines],
        "11 lines removed, links recomputed without the key": _relinked(lines),
        "its last 11 lines removed": lines[:-11],
    }
    checkpoint = (audit.parent / "audit.jsonl.checkpoint").read_text()
    verify = cli(config, "audit", "verify", "--file", str(audit), "--key-file", str(key))
    rows.append((f"audit verify of the untouched log ({len(lines)} records): exit status", str(verify.returncode)))
    for name, forged in forgeries.items():
        copy = data.parent / "forged.jsonl"
        copy.write_text("\n".join(forged) + "\n")
        (data.parent / "forged.jsonl.checkpoint").write_text(checkpoint)
        verify = cli(config, "audit", "verify", "--file", str(copy), "--key-file", str(key))
        rows.append((f"audit verify of the log with {name}: exit status", str(verify.returncode)))
    for path in (data, data / "logs", audit, data / "smartnodule.db", key):
        rows.append((f"mode of {path.relative_to(data.parent)}", oct(stat.S_IMODE(path.stat().st_mode))))
    return rows


if __name__ == "__main__":
    main()
