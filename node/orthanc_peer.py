"""A local Orthanc as a real PACS peer, for `make demo`, tests and benchmarks.

Runs `/usr/sbin/Orthanc CONFIG.json` in the foreground on loopback ports with its
own storage folder; the node is registered as a DICOM modality so that Orthanc
can push studies to it through its REST API.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from orthanc_api_client import OrthancApiClient

ORTHANC_BINARY = "/usr/sbin/Orthanc"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Terminate a child process and wait for it; kill it if it outlives `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def orthanc_available() -> bool:
    return shutil.which(ORTHANC_BINARY) is not None


@dataclass
class OrthancPeer:
    """One Orthanc process on loopback."""

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    check_called_aet: bool = False
    lua_scripts: tuple[Path, ...] = ()
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def client(self) -> OrthancApiClient:
        return OrthancApiClient(self.url)

    def destination(self, name: str = "orthanc") -> dict:
        """This Orthanc as one of the node's `[[destinations]]` (settings as a dict)."""
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.dicom_port}

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> "OrthancPeer":
        """Start Orthanc and wait until its REST API answers.

        A port picked by `free_port` can be taken by another process before Orthanc binds it; an Orthanc
        that exits while starting is started again on fresh ports (read `dicom_port`/`http_port` after
        `start`), up to `attempts` times; the last failure names the end of its log.
        """
        exited = None
        for attempt in range(attempts):
            if attempt:
                self.dicom_port, self.http_port = free_port(), free_port()
            exited = self._start_once(timeout_s)
            if exited is None:
                return self
        raise RuntimeError(f"Orthanc exited with {exited} (last log lines: {self._log_tail()!r}); "
                           f"see {self.workdir / 'orthanc.log'}")

    def _start_once(self, timeout_s: float) -> int | None:
        """One start: None once the REST API answers, the exit status when Orthanc exits while starting."""
        if self.dicom_port == self.http_port:
            self.http_port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "smartnodule-peer",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "LuaScripts": [str(Path(script).resolve()) for script in self.lua_scripts],
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpTimeout": 120,
            "StableAge": 2,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        with (self.workdir / "orthanc.log").open("ab") as log_file:
            self._process = subprocess.Popen(
                [ORTHANC_BINARY, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return self._process.returncode
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return None
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout_s} s")

    def _log_tail(self, lines: int = 3) -> str:
        log = self.workdir / "orthanc.log"
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
        self._process = None

    def __enter__(self) -> "OrthancPeer":
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
