"""The compose topology, run without containers: Orthanc (Debian package) auto-routes stable CT
series to spine-node, and the node's results come back into Orthanc.

Orthanc runs with the configuration that deploy/orthanc/local-config.py derives from
deploy/orthanc/orthanc.json and with deploy/orthanc/route-to-spine-node.lua, exactly as
docs/operations.md (section 1, "Try it on one machine, without containers") tells a newcomer
to run it; the node runs ``spine-node serve`` with deploy/spine-node.local.toml. Only ports,
folders and timings are changed, so that tests run side by side and quickly, and the analysis of
the round-trip test is the phantom's ground truth unless trained weights are there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DCMTK_ENV, REPO, NodeProcess, dcmtk, free_port, wait_for, write_config, write_ct_series

pytestmark = pytest.mark.integration

DEPLOY = REPO / "deploy"
STABLE_AGE_S = 2  # Orthanc's StableAge in these tests (deployments use orthanc.json's value)


def _local_config_module():
    spec = importlib.util.spec_from_file_location("orthanc_local_config",
                                                  DEPLOY / "orthanc" / "local-config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class OrthancProcess:
    """Debian's Orthanc on loopback, configured from deploy/orthanc/."""

    folder: Path
    config: dict
    proc: subprocess.Popen

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    @property
    def http_port(self) -> int:
        return int(self.config["HttpPort"])

    @property
    def aet(self) -> str:
        return self.config["DicomAet"]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=10) as rsp:
            return json.loads(rsp.read())

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")[-4000:]

    def series(self) -> list[dict]:
        return self.get("/series?expand")

    def stable(self) -> bool:
        series = self.series()
        return bool(series) and all(s["IsStable"] for s in series)

    def storescu(self, directory: Path, calling_ae: str = "STORESCU") -> None:
        run = subprocess.run([dcmtk("storescu"), "-aet", calling_ae, "-aec", self.aet, "+sd",
                              "127.0.0.1", str(self.dicom_port), str(directory)],
                             capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture
def orthanc_factory(tmp_path_factory):
    """``orthanc_factory(node_port) -> OrthancProcess`` routing to a node on that port."""
    exe = shutil.which("Orthanc")
    if exe is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    local_config = _local_config_module()
    started: list[subprocess.Popen] = []

    def start(node_port: int) -> OrthancProcess:
        folder = tmp_path_factory.mktemp("orthanc")
        path = local_config.write(folder, node_port=node_port, dicom_port=free_port(),
                                  http_port=free_port(), stable_age=STABLE_AGE_S)
        config = json.loads(path.read_text())
        with open(folder / "orthanc.log", "wb") as log:
            proc = subprocess.Popen([exe, str(path)], stdout=log, stderr=subprocess.STDOUT,
                                    env=DCMTK_ENV, cwd=folder)
        started.append(proc)
        orthanc = OrthancProcess(folder, config, proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}\n{orthanc.log()}")
            try:
                return orthanc.get("/system")["DicomAet"] == orthanc.aet
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(up, 30, "Orthanc to start", orthanc.log)
        return orthanc

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _node_ae() -> str:
    return tomllib.loads((DEPLOY / "spine-node.local.toml").read_text())["node"]["ae_title"]


@pytest.fixture
def storescp(tmp_path):
    """dcmtk storescp standing in for the node (same AE title), writing what it receives."""
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", _node_ae(), "--output-directory",
                             str(out), "+xa", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield port, out
    proc.terminate()
    proc.wait(10)


def test_lua_routes_only_stable_ct_series_that_did_not_come_from_the_node(
        orthanc_factory, storescp, tmp_path):
    port, received = storescp
    orthanc = orthanc_factory(port)
    ct = write_ct_series(tmp_path / "ct", n_slices=12, rows=32, columns=32)
    mr = write_ct_series(tmp_path / "mr", n_slices=5, rows=32, columns=32, modality="MR",
                         study_instance_uid=ct.study_instance_uid,
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    # A CT series that the node sends back (its calling AE is the node's): never routed again.
    echo = write_ct_series(tmp_path / "from-node", n_slices=4, rows=32, columns=32,
                           study_instance_uid=ct.study_instance_uid)
    orthanc.storescu(ct.directory)
    orthanc.storescu(mr.directory)
    orthanc.storescu(echo.directory, calling_ae=_node_ae())

    wait_for(lambda: len(list(received.iterdir())) >= len(ct.paths), 60,
             "the CT series to reach the node's port", orthanc.log)
    wait_for(orthanc.stable, 30, "every series to be stable in Orthanc", orthanc.log)
    wait_for(lambda: all(j["State"] in ("Success", "Failure") for j in orthanc.get(
        "/jobs?expand")), 30, "Orthanc's jobs to finish", orthanc.log)
    time.sleep(1)  # a late, wrong routing job would have started by now

    routed = {p.name.split(".", 1)[1] for p in received.iterdir()}
    assert routed == set(ct.sop_instance_uids)
    jobs = orthanc.get("/jobs?expand")
    assert [j["Type"] for j in jobs] == ["DicomModalityStore"]
    assert jobs[0]["State"] == "Success"


# --- with the real node ---------------------------------------------------------------------

@pytest.fixture
def node(tmp_path_factory):
    """``spine-node serve`` with deploy/spine-node.local.toml, not started; ports, store and
    timings changed for the test. :func:`_start` points its destination at a test Orthanc."""
    root = tmp_path_factory.mktemp("node")
    config = tomllib.loads((DEPLOY / "spine-node.local.toml").read_text())
    config["node"]["port"] = free_port()
    config["http"]["port"] = free_port()
    config["storage"]["root"] = str(root / "store")
    config["storage"]["min_free_mb"] = 1
    config["scheduler"].update(stable_seconds=1, poll_seconds=0.5)
    config.setdefault("worker", {}).update(poll_seconds=0.2, drain_seconds=5)
    config.setdefault("pipeline", {})
    config.setdefault("exporter", {}).update(backoff_start_s=1, poll_seconds=0.5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    process = NodeProcess(root=root, config=config, config_path=root / "spine-node.toml",
                          log_path=root / "node.log", env=env)
    yield process
    try:
        process.stop(timeout=20)
    except Exception:  # noqa: BLE001
        process.kill9()


def _start(node: NodeProcess, orthanc: OrthancProcess) -> None:
    (dest,) = node.config["destinations"]
    assert (dest["ae_title"], dest["host"]) == (orthanc.aet, "127.0.0.1")
    dest["port"] = orthanc.dicom_port
    write_config(node.config_path, node.config)
    node.start()


def _node_series(node: NodeProcess, series_uid: str) -> dict | None:
    for study in node.cli_json("studies"):
        for series in study["series"]:
            if series["series_instance_uid"] == series_uid:
                return series
    return None


def test_study_sent_to_orthanc_is_routed_to_the_node(orthanc_factory, node, tmp_path):
    node.config["worker"]["count"] = 0  # routing only: the job stays queued, no analysis
    orthanc = orthanc_factory(node.port)
    _start(node, orthanc)
    ct = write_ct_series(tmp_path / "ct", n_slices=24, rows=64, columns=64)
    orthanc.storescu(ct.directory)

    def arrived():
        series = _node_series(node, ct.series_instance_uid)
        return series if series and series["instances"] == len(ct.paths) else None

    series = wait_for(arrived, 60, "the series in `spine-node studies --json`",
                      lambda: orthanc.log() + "\n--- node ---\n" + node.log()[-4000:])
    assert series["modality"] == "CT"
    # Orthanc called with its own AE title, the only one the node's allow-list accepts.
    assert node.config["node"]["allowed_calling_aes"] == [orthanc.aet]


def _phantom_study(out: Path) -> Path:
    """A phantom spine study (``spine-node phantom``); skips while the command is not built."""
    # Seed 2 over T11-L3: 71 slices (36 MB), one wedge fracture to find.
    run = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--seed", "2",
                          "--levels", "T11-L3", "--fractures", "L1:2:wedge", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    if run.returncode != 0 and "No such command" in run.stderr:
        pytest.skip("`spine-node phantom` is not in this checkout yet")
    assert run.returncode == 0, run.stdout + run.stderr
    return out / "dicom"


@pytest.mark.parametrize("analysis", [
    "ground-truth",
    pytest.param("models", marks=pytest.mark.slow),
])
def test_results_of_a_routed_study_come_back_into_orthanc(orthanc_factory, node, tmp_path,
                                                          analysis):
    """modality -> Orthanc -> (Lua) -> node -> analysis -> SEG, SR, key image -> Orthanc.

    "ground-truth": the phantom's truth stands in for the models (tests/deploy/
    groundtruth_pipeline.py), so everything else is real and the test takes seconds;
    "models": the trained models, when the checkout has them."""
    if analysis == "models" and not (REPO / "pipeline" / "weights" / "manifest.json").exists():
        pytest.skip("no trained weights in this checkout (pipeline/weights/manifest.json)")
    phantom = tmp_path / "phantom"
    study_dir = _phantom_study(phantom)
    if analysis == "ground-truth":
        node.config["pipeline"]["entry_point"] = "tests.deploy.groundtruth_pipeline:analyse"
        node.env["GROUND_TRUTH_PHANTOM_DIR"] = str(phantom)
    orthanc = orthanc_factory(node.port)
    _start(node, orthanc)
    orthanc.storescu(study_dir)
    gt = json.loads((phantom / "gt.json").read_text())

    def results_back():
        log = node.log()
        if '"job finished"' in log and '"state": "failed"' in log:  # fail now, not at timeout
            raise AssertionError(f"the node's job failed\n{diagnostics()}")
        by_modality: dict[str, list[dict]] = {}
        for s in orthanc.series():
            tags = s["MainDicomTags"]
            by_modality.setdefault(tags.get("Modality"), []).append(tags)
        return by_modality if {"SEG", "SR", "OT"} <= set(by_modality) else None

    def diagnostics() -> str:
        jobs = node.cli("jobs", "--json", check=False).stdout
        return f"jobs: {jobs}\n--- node ---\n{node.log()[-4000:]}\n--- orthanc ---\n" \
               + orthanc.log()

    by_modality = wait_for(results_back, 120 if analysis == "ground-truth" else 1500,
                           "SEG, SR and key image (OT) in Orthanc", diagnostics)
    assert sorted(by_modality) == ["CT", "OT", "SEG", "SR"]
    assert all(len(series) == 1 for series in by_modality.values()), by_modality
    studies = orthanc.get("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == \
        [gt["study_instance_uid"]], "the results are in the source study"
    # Only the CT series went to the node: its own results were not routed back to it.
    time.sleep(STABLE_AGE_S + 1)
    store_jobs = [j for j in orthanc.get("/jobs?expand") if j["Type"] == "DicomModalityStore"]
    assert len(store_jobs) == 1
    (job,) = node.cli_json("jobs")
    assert job["state"] == "done"
