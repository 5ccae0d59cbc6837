"""A real Orthanc (Debian package ``orthanc``) on loopback, started by a test.

Temporary configuration: DICOM and HTTP on free ports, storage in a temporary directory,
RemoteAccessAllowed false, no plugins; dcmtk-based, so TCP_NODELAY=1 in its environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port


def orthanc_binary() -> str:
    for candidate in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", shutil.which("Orthanc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Orthanc is not installed (apt-get install orthanc)")


@dataclass
class Orthanc:
    root: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    check_called_aet: bool = False
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }

    def start(self, timeout: float = 60.0) -> "Orthanc":
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.root / "orthanc.log", "ab")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not start:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: bytes | str) -> Any:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read())

    def instance_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        for hit in self.post("/tools/lookup", sop_instance_uid):
            if hit.get("Type") == "Instance":
                return hit["ID"]
        return None

    def has(self, *sop_instance_uids: str) -> bool:
        return all(self.instance_id(uid) for uid in sop_instance_uids)

    def tags(self, sop_instance_uid: str) -> dict[str, Any]:
        return self.get(f"/instances/{self.instance_id(sop_instance_uid)}/simplified-tags")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
