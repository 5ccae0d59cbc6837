"""The OHIF viewer, served and driven as a radiologist's browser would, for tests/deploy/test_viewer.py.

- :func:`ohif_dist`: OHIF's prebuilt static site, the ``dist/`` of the npm package ``@ohif/app``
  (fetched once with ``npm pack`` into a cache folder, never committed);
- :class:`NginxFront`: Debian's nginx on loopback with deploy/ohif/nginx.conf.template (the
  server block compose uses: ``try_files``, COOP/COEP/CORP headers, ``/dicom-web/`` and
  ``/wado`` proxied to Orthanc), serving the dist with deploy/ohif/app-config.js;
- :class:`Chromium`: headless Chromium with a DevTools (CDP) connection over a websocket:
  navigate, evaluate JavaScript, click, screenshot, and the console's errors.

Everything listens on 127.0.0.1 and every process is stopped by its PID.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, free_port, wait_for

#: The OHIF release the test was written against (3.13.x); SPINE_NODE_OHIF_VERSION overrides.
OHIF_VERSION = os.environ.get("SPINE_NODE_OHIF_VERSION", "3.13.2")
#: Where the npm package is unpacked (one folder per version); SPINE_NODE_OHIF_CACHE overrides.
OHIF_CACHE = Path(os.environ.get("SPINE_NODE_OHIF_CACHE", REPO / "var" / "cache" / "ohif"))
OHIF_CONFIG = REPO / "deploy" / "ohif"


def _executable(*candidates: str) -> str | None:
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


def require(name: str, *candidates: str, install: str) -> str:
    """Path of a program the viewer test needs; skips the test (naming the package) without it."""
    found = _executable(*candidates, name)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {install}; .ci/run installs it)")
    return found


def ohif_dist(version: str = OHIF_VERSION, cache: Path = OHIF_CACHE) -> Path:
    """The ``dist/`` folder of ``@ohif/app@version``, fetched with ``npm pack`` when missing.

    npm checks the tarball against the registry's integrity hash; the unpacked folder is moved
    into place in one rename, so an interrupted fetch leaves nothing half-written behind.
    """
    target = cache / version
    dist = target / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = require("npm", install="npm")
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".fetch-{version}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        run = subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination",
                              str(work), "--json"], capture_output=True, text=True,
                             timeout=600, cwd=work)
        if run.returncode != 0:
            pytest.skip(f"npm pack @ohif/app@{version} failed (no registry?):\n{run.stderr[-2000:]}")
        (tgz,) = work.glob("*.tgz")
        unpacked = work / "unpacked"
        with tarfile.open(tgz) as tar:
            tar.extractall(unpacked, filter="data")
        if not (unpacked / "package" / "dist" / "index.html").is_file():
            raise AssertionError(f"@ohif/app@{version} holds no dist/index.html")
        try:
            (unpacked).rename(target)
        except OSError:  # another run put it there first
            if not (dist / "index.html").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dist


def site_root(dist: Path, folder: Path, app_config: Path = OHIF_CONFIG / "app-config.js") -> Path:
    """A web root: the dist's files (symbolic links) with our app-config.js in place of its own,
    as compose mounts it over /usr/share/nginx/html/app-config.js."""
    root = folder / "html"
    root.mkdir(parents=True)
    for entry in dist.iterdir():
        if entry.name != "app-config.js":
            (root / entry.name).symlink_to(entry)
    shutil.copyfile(app_config, root / "app-config.js")
    return root


def nginx_server_block(port: int, orthanc_http_port: int, root: Path,
                       template: Path = OHIF_CONFIG / "nginx.conf.template") -> str:
    """deploy/ohif/nginx.conf.template with only the addresses changed: it listens on
    127.0.0.1 (not on every interface), reaches Orthanc on loopback (not the compose host
    ``orthanc``) and serves ``root``. Fails if the template no longer has what is replaced."""
    # The template's comments name ${PORT} too: only its directives are kept.
    replaced = "".join(line for line in template.read_text().splitlines(keepends=True)
                       if not line.lstrip().startswith("#"))
    replaced = re.sub(r"^\s*listen \[::\]:\$\{PORT\}[^;]*;\n", "", replaced, flags=re.M)
    replaced = replaced.replace("listen ${PORT}", f"listen 127.0.0.1:{port}")
    replaced = replaced.replace("http://orthanc:8042", f"http://127.0.0.1:{orthanc_http_port}")
    replaced = replaced.replace("/usr/share/nginx/html", str(root))
    assert "${" not in replaced and "orthanc:8042" not in replaced, \
        f"{template} changed: the test cannot put it on loopback\n{replaced}"
    assert f"listen 127.0.0.1:{port}" in replaced and str(root) in replaced, replaced
    return replaced


@dataclass
class NginxFront:
    """nginx (Debian) serving OHIF and proxying Orthanc, on 127.0.0.1:``port``."""

    folder: Path
    dist: Path
    orthanc_http_port: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        root = site_root(self.dist, self.folder)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "tmp"
        # As root, nginx's workers would otherwise run as "nobody", who cannot read the test's
        # private folders.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return (
            f"{user}daemon off;\nworker_processes 1;\npid {self.folder}/nginx.pid;\n"
            f"error_log {self.folder}/error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "  include /etc/nginx/mime.types;\n  default_type application/octet-stream;\n"
            f"  access_log {self.folder}/access.log;\n"
            f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n"
            + nginx_server_block(self.port, self.orthanc_http_port, root) + "\n}\n")

    def start(self) -> "NginxFront":
        exe = require("nginx", "/usr/sbin/nginx", install="nginx")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(self.config())
        with open(self.folder / "nginx.out", "wb") as out:
            self.proc = subprocess.Popen(
                [exe, "-p", str(self.folder), "-e", str(self.folder / "error.log"), "-c",
                 str(conf)], stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/app-config.js", timeout=5) as rsp:
                    return rsp.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(up, 30, "nginx to serve OHIF", self.log)
        return self

    def log(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s: the one process started, by its PID."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CdpError(RuntimeError):
    pass


@dataclass
class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    folder: Path
    width: int = 1600
    height: int = 1000
    proc: subprocess.Popen | None = None
    ws: Any = None
    console: list[dict] = field(default_factory=list)
    _next_id: int = 0

    def start(self, timeout: float = 60.0) -> "Chromium":
        exe = require("chromium", "/usr/bin/chromium", "chromium-browser", "google-chrome",
                      install="chromium")
        pytest.importorskip("websocket", reason="pip install websocket-client (the project's "
                                                "test extras)")
        profile = self.folder / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        args = [exe, "--headless=new", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--user-data-dir={profile}",
                f"--window-size={self.width},{self.height}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
                # WebGL without a GPU (cornerstone renders with it): SwiftShader.
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--ignore-gpu-blocklist", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        with open(self.folder / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        active = profile / "DevToolsActivePort"

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}\n{self.log()}")
            lines = active.read_text().split() if active.exists() else []
            return int(lines[0]) if lines else None

        debug_port = wait_for(port, timeout, "Chromium's DevTools port", self.log)
        return self.connect(debug_port, timeout)

    def connect(self, debug_port: int, timeout: float = 60.0) -> "Chromium":
        """Attach to the first page of the Chromium whose DevTools listen on ``debug_port``."""
        websocket = pytest.importorskip("websocket", reason="pip install websocket-client "
                                                            "(the project's test extras)")
        pages = wait_for(lambda: [t for t in _json(f"http://127.0.0.1:{debug_port}/json/list")
                                  if t.get("type") == "page"], timeout, "a page target",
                         self.log)
        url = pages[0]["webSocketDebuggerUrl"]
        assert url.startswith("ws://127.0.0.1:"), url
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def resize(self, width: int, height: int) -> None:
        """Make the page ``width`` x ``height`` CSS pixels (the viewer lays itself out again)."""
        self.width, self.height = width, height
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def log(self) -> str:
        path = self.folder / "chromium.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # -- the protocol ----------------------------------------------------------------------
    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", "")))
                            for a in params.get("args", []))
            self.console.append({"level": params.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append({"level": "exception", "text": text})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"level": f"log-{entry.get('level')}",
                                 "text": f"{entry.get('text', '')} {entry.get('url', '')}"})

    def send(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == msg_id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def pump(self, seconds: float) -> None:
        """Read events (console messages) for ``seconds``."""
        end = time.monotonic() + seconds
        self.ws.settimeout(0.2)
        try:
            while time.monotonic() < end:
                try:
                    self._event(json.loads(self.ws.recv()))
                except Exception as exc:
                    if "timed out" not in str(exc).lower() and "timeout" not in type(exc).__name__.lower():
                        raise
        finally:
            self.ws.settimeout(60)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy (its value is returned); fails at
        once when the page reports a crash (:meth:`crashes`)."""
        seen = len(self.console)

        def check() -> Any:
            self.pump(0.3)
            crashed = self.crashes(self.console[seen:])
            if crashed:
                raise AssertionError(f"the viewer failed while waiting for {what}: {crashed}\n"
                                     + self.diagnostics())
            return self.evaluate(expression)

        return wait_for(check, timeout, what, lambda: self.diagnostics(), interval=0.2)

    @staticmethod
    def crashes(console: list[dict]) -> list[str]:
        """Console entries, at any level, that say the page failed: an uncaught exception, a
        JavaScript error (OHIF logs its error boundary's at level "debug"), "Something went
        wrong"."""
        pattern = re.compile(r"TypeError|ReferenceError|RangeError|Error Boundary|"
                             r"Something went wrong|Uncaught")
        return [c["text"][:500] for c in console
                if c["level"] in ("error", "exception") or pattern.search(c["text"])]

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def diagnostics(self) -> str:
        return ("--- page text ---\n" + self.text()[-3000:] + "\n--- console errors ---\n"
                + "\n".join(self.crashes(self.console)[-20:]))

    def click_at(self, x: float, y: float, count: int = 1) -> None:
        """A real mouse click (or double click) at page coordinates."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                          clickCount=n)

    def click_text(self, selector: str, text: str, count: int = 1) -> dict:
        """Click the centre of the first element matching ``selector`` whose text contains
        ``text``; returns its box. Raises when there is none."""
        box = self.evaluate(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
              .filter(e => e.innerText && e.innerText.includes({json.dumps(text)}));
            els.sort((a, b) => a.innerText.length - b.innerText.length);
            if (!els.length) return null;
            els[0].scrollIntoView({{block: 'center'}});
            const r = els[0].getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2, w: r.width, h: r.height}};
        }})()""")
        if not box:
            raise CdpError(f"no {selector} with text {text!r} on the page\n{self.diagnostics()}")
        self.click_at(box["x"], box["y"], count)
        return box

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def stop(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            # Chromium's helpers (renderer, GPU, zygote) are in its own session: signal the
            # group it leads, whose id is the PID of the process this test started.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def _json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return json.loads(rsp.read())
    except (urllib.error.URLError, ConnectionError):
        return []
