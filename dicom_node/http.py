"""HTTP: ``/health`` (JSON; 200 when the database answers, the store is writable and free disk
is above ``storage.min_free_mb``, else 503 with the reasons) and ``/metrics`` (Prometheus).
Binds ``http.host`` (127.0.0.1 by default)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dicom_node.logging import get_logger
from storage.db import Database
from storage.files import BlobStore

log = get_logger("spine_node.http")


#: /health is unhealthy this close above the free-space floor: C-STORE refuses an instance
#: that would not fit above the floor (a CT slice is 0.5 MB, an Enhanced CT tens of MB).
HEADROOM_BYTES = 16 * 2**20


def health(db: Database, store: BlobStore) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {}
    problems: list[str] = []
    try:
        db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = "unreachable"
        problems.append(f"database unreachable: {type(exc).__name__}")
    try:
        store.check_writable()
        checks["store"] = "ok"
    except OSError as exc:
        checks["store"] = "not writable"
        problems.append(f"store not writable: {exc.strerror or exc}")
    try:
        free_mb = store.free_bytes() // 2**20
        checks["free_mb"] = free_mb
        floor = store.min_free_bytes // 2**20
        checks["min_free_mb"] = floor
        if store.min_free_bytes and free_mb * 2**20 < store.min_free_bytes:
            problems.append(f"free disk {free_mb} MB below storage.min_free_mb = {floor}")
        elif store.min_free_bytes and free_mb * 2**20 < store.min_free_bytes + HEADROOM_BYTES:
            # The SCP refuses an instance that would take free space below the floor, so just
            # above the floor most instances are already answered 0xA700.
            problems.append(f"free disk {free_mb} MB is within {HEADROOM_BYTES // 2**20} MB "
                            f"above storage.min_free_mb = {floor}: instances that do not fit "
                            f"above it are refused (0xA700); free disk below "
                            f"storage.min_free_mb + {HEADROOM_BYTES // 2**20} MB")
    except OSError as exc:
        problems.append(f"free disk unknown: {exc}")
    body = {"status": "ok" if not problems else "unhealthy", "checks": checks}
    if problems:
        body["reasons"] = problems
    return not problems, body


class HttpServer:
    def __init__(self, host: str, port: int, db: Database, store: BlobStore):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "spine-node"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    ok, body = health(outer.db, outer.store)
                    self._send(200 if ok else 503, json.dumps(body).encode(),
                               "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("http " + fmt % args)

        self.db, self.store = db, store
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()
        log.info("http listening", extra={"host": self.httpd.server_address[0],
                                          "port": self.port})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
