"""A Docker engine on this machine, for tests/deploy/test_container.py.

- :class:`Engine`: the daemon. An engine that already answers is used as it is; otherwise
  Debian's ``dockerd`` is started with ``--bridge=none`` (no bridge, no private-range address:
  every build and container uses host networking on loopback) and stopped by its PID afterwards.
- :func:`local_base`: no image registry is reachable here, so the base image is made locally with
  ``debootstrap --variant=minbase bookworm`` from the Debian mirror apt already uses, then
  ``docker import``. Docker keeps it, so only the first run pays for it (about 40 s).
- :meth:`Engine.build`: ``docker build --network host`` with the classic builder (no BuildKit
  frontend image to pull), from a context folder.
- :func:`node_context`: the build context of deploy/Dockerfile as deploy/Dockerfile.dockerignore
  lets it through (the classic builder reads only a root .dockerignore), plus the CPU torch wheel
  from pip's find-links when there is one, so that the build needs no PyTorch index.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import REPO

IMAGES = Path(__file__).resolve().parent / "images"
#: Tags of the local images (repository names that no registry serves).
BASE_TAG = "spine-node-test/debian:bookworm-minbase"
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def docker_binary() -> str | None:
    return shutil.which("docker")


def unavailable_reason() -> str | None:
    """Why the container tests cannot run here, or None."""
    if docker_binary() is None:
        return "no docker CLI (apt-get install docker.io)"
    if _engine_answers():
        return None
    if shutil.which("dockerd") is None:
        return "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "no Docker engine answers and starting dockerd needs root"
    return None


def _engine_answers() -> bool:
    try:
        run = subprocess.run([docker_binary() or "docker", "version", "--format",
                              "{{.Server.Version}}"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


class Engine:
    """The Docker engine the tests use; :meth:`close` stops it if :meth:`open` started it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def open(self, timeout: float = 60.0) -> "Engine":
        if _engine_answers():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "dockerd.log", "wb") as log:
            # No bridge and no iptables rules: containers get host networking only.
            self.proc = subprocess.Popen(
                ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log()}")
            if _engine_answers():
                return self
            time.sleep(0.5)
        self.close()
        raise TimeoutError("dockerd did not answer:\n" + self.log())

    def log(self) -> str:
        path = self.folder / "dockerd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        """Stop the daemon this object started (SIGTERM to its PID; containerd, its child,
        goes with it)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    # --- commands -------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               env: dict | None = None, input: str | None = None,
               ) -> subprocess.CompletedProcess:
        run = subprocess.run([docker_binary(), *args], capture_output=True, text=True,
                             timeout=timeout, env=env, input=input)
        if check and run.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited with {run.returncode}:\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return run

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def image_id(self, tag: str) -> str | None:
        run = self.docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        return run.stdout.strip() if run.returncode == 0 else None

    def build(self, tag: str, context: Path, dockerfile: Path | None = None,
              build_args: dict[str, str] | None = None, target: str | None = None,
              timeout: float = 1800) -> str:
        """``docker build --network host``; returns the build's output (for its timings).

        The image that ``tag`` named before is removed when the build replaced it, so that runs
        do not pile up untagged images (layers the new image shares stay, as Docker's cache)."""
        previous = self.image_id(tag)
        args = ["build", "--network", "host", "--force-rm", "-t", tag]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        if target is not None:
            args += ["--target", target]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        output = self.docker(*args, str(context), timeout=timeout, env=BUILD_ENV).stdout
        if previous is not None and previous != self.image_id(tag):
            self.docker("image", "rm", previous, check=False)
        return output

    def image_size(self, tag: str) -> int:
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)


# --- images --------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The URI apt uses for Debian's main archive (deb822 ``.sources`` or one-line lists)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split() \
                    and "security" not in uris.group(1):
                return uris.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def local_base(engine: Engine) -> str:
    """The Debian bookworm minbase image, made once with debootstrap and kept by Docker."""
    if engine.has_image(BASE_TAG):
        return BASE_TAG
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise AssertionError("no local base image and no debootstrap (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="spine-node-rootfs-") as root:
        run = subprocess.run([debootstrap, "--variant=minbase", "bookworm", root,
                              debian_mirror()], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"debootstrap failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker_binary(), "import", "-", BASE_TAG], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        tar.wait()
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr
    return BASE_TAG


HOST_CA = Path("/usr/local/share/ca-certificates")


def local_image(engine: Engine, name: str, base: str, folder: Path,
                extra: dict[str, Path] | None = None) -> str:
    """``spine-node-test/<name>`` from tests/deploy/images/<name>/, built in ``folder`` with
    ``extra`` (context path -> file or folder) and the host's own CA certificates (extra-ca/)
    beside its files. Docker's cache makes a rebuild of unchanged inputs take seconds."""
    tag = f"spine-node-test/{name}:latest"
    context = folder / f"context-{name}"
    shutil.copytree(IMAGES / name, context)
    (context / "extra-ca").mkdir()
    for cert in sorted(HOST_CA.glob("**/*.crt")) if HOST_CA.is_dir() else []:
        shutil.copy2(cert, context / "extra-ca" / cert.name)
    for inside, source in (extra or {}).items():
        if source.is_dir():
            shutil.copytree(source, context / inside, symlinks=False)
        else:
            shutil.copy2(source, context / inside)
    engine.build(tag, context, build_args={"BASE_IMAGE": base})
    return tag


def _find_links() -> list[Path]:
    """pip's find-links folders (environment and configuration), where a local torch wheel
    may lie."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    pip = shutil.which("pip") or shutil.which("pip3")
    if pip:
        run = subprocess.run([pip, "config", "list"], capture_output=True, text=True, timeout=60)
        for line in run.stdout.splitlines():
            if re.match(r"^[\w:.-]*find-links=", line):
                found += line.split("=", 1)[1].strip("'\"").split()
    return [Path(p.removeprefix("file://")) for p in found if not re.match(r"^https?:", p)]


def torch_wheel(version: str, flavor: str = "cpu") -> Path | None:
    """``torch-<version>+<flavor>-*.whl`` from SPINE_NODE_TORCH_WHEEL or pip's find-links."""
    explicit = os.environ.get("SPINE_NODE_TORCH_WHEEL")
    if explicit:
        return Path(explicit)
    for folder in _find_links():
        for wheel in sorted(folder.glob(f"torch-{version}+{flavor}-cp311-*.whl")):
            return wheel
    return None


def dockerfile_arg(name: str) -> str:
    """The default of ``ARG name=...`` in deploy/Dockerfile."""
    m = re.search(rf"^ARG {name}=(\S+)$", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    assert m, f"deploy/Dockerfile has no ARG {name}"
    return m.group(1)


def node_context(folder: Path) -> Path:
    """deploy/Dockerfile's build context as deploy/Dockerfile.dockerignore lets it through
    ('**' then '!path' lines), with the CPU torch wheel in deploy/wheels/ when pip has one."""
    lines = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in lines, "the .dockerignore no longer starts from an empty context"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl")
    for line in lines:
        if not line.startswith("!"):
            continue
        source = REPO / line[1:].rstrip("/")
        target = folder / line[1:].rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    shutil.copy2(REPO / "deploy" / "Dockerfile", folder / "deploy" / "Dockerfile")
    wheel = torch_wheel(dockerfile_arg("TORCH_VERSION"), dockerfile_arg("TORCH_FLAVOR"))
    if wheel is not None:
        wheels = folder / "deploy" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        try:
            os.link(wheel, wheels / wheel.name)
        except OSError:
            shutil.copy2(wheel, wheels / wheel.name)
    return folder
