"""The Storage SCP with the real dcmtk tools against ``spine-node serve`` in a subprocess:
a 300-slice series is stored, indexed and queued; nothing acknowledged is lost to ``kill -9``;
calling-AE allow-list; hostile and broken datasets; out of disk space. The receive tests run
on both paths (``fast_path``: ``node.fast_path`` true and false)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from storage.db import Database
from tests.helpers import DCMTK_ENV, NodeProcess, dcmtk, storescu, write_ct_series

pytestmark = pytest.mark.integration

FAKE_PIPELINE = {"entry_point": "tests.dicom_node.fake_pipeline:analyse"}
BIG_SLICES = 300


@pytest.fixture(scope="module")
def big_series(tmp_path_factory):
    """300 slices of 512 x 512 (150 MB), written once for the module."""
    return write_ct_series(tmp_path_factory.mktemp("big") / "ct", n_slices=BIG_SLICES,
                           rows=512, columns=512, slice_spacing=1.0)


def _db(node: NodeProcess) -> Database:
    return Database(f"sqlite:///{node.store_root}/spine-node.db")


def _indexed_sops(node: NodeProcess) -> set[str]:
    db = _db(node)
    try:
        with db.engine.connect() as conn:
            return {r[0] for r in conn.execute(text("SELECT sop_instance_uid FROM instances"))}
    except Exception:  # noqa: BLE001 - the schema may not exist yet
        return set()
    finally:
        db.dispose()


def _stored_files(node: NodeProcess) -> list[Path]:
    base = node.store_root / "instances"
    return [p for p in base.rglob("*") if p.is_file()] if base.exists() else []


def _jobs(node: NodeProcess) -> list[dict]:
    return node.cli_json("jobs")


def _acknowledged_files(storescu_output: str) -> list[str]:
    """Files for which dcmtk storescu -v logged a Success response."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_storescu_series_is_indexed_queued_and_claimed(node_factory, big_series, fast_path):
    node = node_factory(pipeline=FAKE_PIPELINE, node={"fast_path": fast_path}).start()
    start = time.perf_counter()
    res = storescu(node, big_series.directory)
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"\nspine-node receive (fast_path={fast_path}): {BIG_SLICES} x 512x512 slices in "
          f"{seconds:.2f} s")

    [study] = node.cli_json("studies")
    assert study["study_instance_uid"] == big_series.study_instance_uid
    [series] = study["series"]
    contract = {"series_instance_uid", "modality", "instances", "state"}  # DESIGN.md
    assert {k: series[k] for k in contract} == {
        "series_instance_uid": big_series.series_instance_uid, "modality": "CT",
        "instances": BIG_SLICES, "state": series["state"]}
    files = _stored_files(node)
    assert len(files) == BIG_SLICES
    assert {f.stem for f in files} == set(big_series.sop_instance_uids)
    # Stored exactly as received: the pixel bytes match the sent file.
    sent = pydicom.dcmread(big_series.paths[7])
    stored = pydicom.dcmread(node.store_root / "instances" / big_series.study_instance_uid
                             / big_series.series_instance_uid
                             / f"{big_series.sop_instance_uids[7]}.dcm")
    assert stored.PixelData == sent.PixelData
    for f in files[::25]:
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == f.stem

    jobs = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] in ("done", "failed")],
                         timeout=120, what="the job to be claimed and finished")
    assert len(_jobs(node)) == 1
    [job] = jobs
    assert set(job) >= {"id", "study_instance_uid", "series_instance_uid", "state", "error",
                        "attempts"}  # DESIGN.md's contract keys (more may follow)
    assert job["attempts"] == 1 and job["state"] == "done", job
    summary = list(node.store_root.glob("results/*/*/v1-job*/summary.json"))
    assert len(summary) == 1
    assert json.loads(summary[0].read_text())["series_instance_uid"] == \
        big_series.series_instance_uid

    status, body = node.http_get("/metrics")
    assert status == 200
    assert f'spine_node_instances_received_total{{status="success"}} {BIG_SLICES}.0' in \
        body.decode()
    assert 'spine_node_jobs{state="done"} 1.0' in body.decode()
    status, body = node.http_get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert node.stop() == 0  # SIGTERM drains and exits cleanly


def test_kill9_mid_transfer_loses_no_acknowledged_instance(node_factory, big_series, fast_path):
    node = node_factory(pipeline=FAKE_PIPELINE, worker={"count": 0},
                        node={"fast_path": fast_path}).start()
    proc = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", node.ae_title, "+sd",
                             "127.0.0.1", str(node.port), str(big_series.directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=DCMTK_ENV)
    node.wait_for(lambda: len(_indexed_sops(node)) >= 60, timeout=60, interval=0.05,
                  what="part of the series to arrive")
    node.kill9()
    output, _ = proc.communicate(timeout=60)
    acked = _acknowledged_files(output)
    assert 0 < len(acked) < BIG_SLICES, output[-2000:]
    acked_sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked}

    node.start()
    indexed = _indexed_sops(node)
    assert acked_sops <= indexed, f"{len(acked_sops - indexed)} acknowledged but lost"
    assert not list(node.store_root.rglob(".tmp-*")), "temporaries left after restart"
    # A file written but not indexed when the node died is quarantined (storage.recovery).
    assert len(_stored_files(node)) == len(indexed), "an unindexed file survived the restart"

    res = storescu(node, big_series.directory)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(_indexed_sops(node)) == BIG_SLICES
    assert len(_stored_files(node)) == BIG_SLICES
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == BIG_SLICES


def test_calling_ae_allow_list_rejects_at_association(node_factory):
    node = node_factory(node={"allowed_calling_aes": ["MODALITY1"]}).start()
    echo = [dcmtk("echoscu"), "-aec", node.ae_title]
    bad = subprocess.run([*echo, "-aet", "INTRUDER", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout + bad.stderr
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    good = subprocess.run([*echo, "-v", "-aet", "MODALITY1", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Received Echo Response (Success)" in good.stdout + good.stderr
    db = _db(node)
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT actor, outcome FROM audit_events "
                                 "WHERE event_type = 'association' AND outcome = 'rejected'")).all()
    db.dispose()
    assert rows == [("INTRUDER@127.0.0.1", "rejected")]


def _hostile_file(path: Path, mutate) -> Path:
    w = write_ct_series(path.parent / (path.name + "-src"), n_slices=1, rows=16, columns=16)
    ds = pydicom.dcmread(w.paths[0])
    mutate(ds)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hostile_and_broken_datasets_are_refused_or_fail_with_a_reason(node_factory, tmp_path,
                                                                        fast_path):
    node = node_factory(pipeline=FAKE_PIPELINE, node={"fast_path": fast_path}).start()
    evil = tmp_path / "evil"
    evil.mkdir()
    bad_files = [
        _hostile_file(evil / "slash.dcm",
                      lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3/../../../../evil")),
        _hostile_file(evil / "dotdot.dcm",
                      lambda ds: setattr(ds, "StudyInstanceUID", "1.2..3")),
        _hostile_file(evil / "traverse.dcm",
                      lambda ds: setattr(ds, "SeriesInstanceUID", "../../../../tmp")),
    ]
    res = storescu(node, bad_files, "-v", "-nh")
    out = res.stdout + res.stderr
    assert "Received Store Response (Success)" not in out, out
    assert out.count("Received Store Response") == len(bad_files), out
    assert not _stored_files(node)

    def no_pixels(ds, k):
        if k == 5:
            del ds.PixelData

    def short_pixels(ds, k):
        if k == 5:
            ds.PixelData = ds.PixelData[:64]

    cases = {
        "no-pixels": (dict(n_slices=25, mutate=no_pixels), "failed", "has no pixel data"),
        "short-pixels": (dict(n_slices=25, mutate=short_pixels), "failed",
                         "pixel data is 64 bytes"),
        "one-position": (dict(n_slices=30, z_positions=[0.0] * 30), "failed",
                         "30 slices share position"),
        "mr": (dict(n_slices=25, modality="MR"), "skipped", "modality MR is not selected"),
        "three": (dict(n_slices=3), "skipped", "3 slices, fewer than selection.min_slices"),
    }
    series_of = {}
    for name, (kwargs, _, _) in cases.items():
        w = write_ct_series(tmp_path / name, rows=32, columns=32, **kwargs)
        series_of[name] = w.series_instance_uid
        res = storescu(node, w.directory)
        assert res.returncode == 0, res.stdout + res.stderr

    def settled():
        jobs = {j["series_instance_uid"]: j for j in _jobs(node)}
        if all(jobs.get(uid, {}).get("state") in ("failed", "skipped", "done")
               for uid in series_of.values()):
            return jobs
        return None

    jobs = node.wait_for(settled, timeout=90, what="all hostile series to settle")
    for name, (_, state, reason) in cases.items():
        job = jobs[series_of[name]]
        assert job["state"] == state, (name, job)
        assert reason in job["error"], (name, job)

    # Nothing outside the store; no file named after a hostile UID anywhere.
    for p in node.root.rglob("*"):
        if p.is_file():
            assert p == node.config_path or p == node.log_path or \
                node.store_root in p.parents, p
    assert not [p for p in Path(tmp_path.anchor, "tmp").glob("evil*")]
    assert not list(node.root.rglob("*evil*"))
    # The node keeps answering.
    res = node.cli("echo", f"{node.ae_title}@127.0.0.1:{node.port}")
    assert "Success" in res.stdout
    # Logs and index carry no patient name or ID (write_ct_series sets these).
    db_bytes = b"".join(p.read_bytes() for p in node.store_root.glob("spine-node.db*"))
    for secret in ("Test^Phantom", "PHANTOM-1"):
        assert secret not in node.log()
        assert secret.encode() not in db_bytes


def test_late_instance_reopens_series_as_new_job_version(node_factory, tmp_path):
    node = node_factory(pipeline=FAKE_PIPELINE).start()
    w = write_ct_series(tmp_path / "a", n_slices=21, rows=32, columns=32)
    assert storescu(node, w.directory).returncode == 0
    node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60,
                  what="version 1 done")
    late = write_ct_series(tmp_path / "b", n_slices=1, rows=32, columns=32,
                           z_positions=[21.0], study_instance_uid=w.study_instance_uid,
                           series_instance_uid=w.series_instance_uid,
                           frame_of_reference_uid=w.frame_of_reference_uid)
    assert storescu(node, late.directory).returncode == 0
    jobs = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"]
                         if len(_jobs(node)) == 2 else None, timeout=60,
                         what="version 2 done")
    assert len(jobs) == 2
    assert len(list(node.store_root.glob("results/*/*/v2-job*/summary.json"))) == 1
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == 22


def test_out_of_resources_below_free_space_floor(node_factory, tmp_path, fast_path):
    node = node_factory(storage={"min_free_mb": 10**9},  # a petabyte floor
                        node={"fast_path": fast_path}).start()
    w = write_ct_series(tmp_path / "s", n_slices=3, rows=16, columns=16)
    res = storescu(node, w.directory, "-v", "-nh")  # -nh: go on after a refusal
    out = res.stdout + res.stderr
    assert out.count("Received Store Response (Refused: OutOfResources)") == 3, out
    assert not _stored_files(node)
    assert not list(node.store_root.rglob(".tmp-*"))
    status, body = node.http_get("/health")
    assert status == 503
    assert "below storage.min_free_mb" in json.loads(body)["reasons"][0]


def test_compressed_transfer_syntaxes_are_stored_as_received(node_factory, tmp_path, fast_path):
    """JPEG lossless, JPEG-LS, JPEG 2000 and RLE (dcmtk encoders) arrive byte for byte, over
    concurrent associations."""
    node = node_factory(pipeline=FAKE_PIPELINE, node={"fast_path": fast_path}).start()
    w = write_ct_series(tmp_path / "raw", n_slices=4, rows=64, columns=64)
    # (encoder, its flags, the storescu option that proposes that transfer syntax)
    encoders = [("dcmcjpeg", ["+e1"], "-xs"), ("dcmcjpls", ["+el"], "-xt"),
                ("dcmcrle", [], "-xr")]
    sent = []
    for k, (tool, flags, propose) in enumerate(encoders):
        out = tmp_path / f"{tool}.dcm"
        subprocess.run([dcmtk(tool), *flags, str(w.paths[k]), str(out)], check=True,
                       capture_output=True)
        sent.append((out, propose))
    try:
        j2k = tmp_path / "j2k.dcm"
        ds = pydicom.dcmread(w.paths[3])
        ds.compress(pydicom.uid.JPEG2000Lossless)
        ds.save_as(j2k)
        sent.append((j2k, "-xv"))
    except Exception:  # noqa: BLE001 - no JPEG 2000 encoder in this environment
        pass
    procs = [subprocess.Popen([dcmtk("storescu"), propose, "-aec", node.ae_title,
                               "127.0.0.1", str(node.port), str(f)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for f, propose in sent]  # all at once: concurrent associations
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
    assert len(sent) >= 3
    for f, _ in sent:
        original = pydicom.dcmread(f)
        stored = pydicom.dcmread(node.store_root / "instances" / w.study_instance_uid /
                                 w.series_instance_uid / f"{original.SOPInstanceUID}.dcm")
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.file_meta.TransferSyntaxUID.is_compressed
        assert stored.PixelData == original.PixelData


def test_worker_command_claims_jobs_that_serve_leaves(node_factory, tmp_path):
    node = node_factory(pipeline=FAKE_PIPELINE, worker={"count": 0}).start()
    w = write_ct_series(tmp_path / "ct", n_slices=20, rows=16, columns=16)
    assert storescu(node, w.directory).returncode == 0
    node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "queued"], timeout=30,
                  what="a queued job")
    worker = subprocess.Popen([os.sys.executable, "-m", "dicom_node", "worker", "--config",
                               str(node.config_path)], env=node.env, cwd=node.root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60,
                      what="the worker to finish the job")
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out
    assert '"worker stopped"' in out


def test_postgresql_database_url_works_unchanged(node_factory, postgres_url, tmp_path):
    from tests.helpers import create_pg_database
    url = create_pg_database(postgres_url, "node_scp")
    node = node_factory(pipeline=FAKE_PIPELINE, storage={"database_url": url}).start()
    w = write_ct_series(tmp_path / "ct", n_slices=20, rows=16, columns=16)
    assert storescu(node, w.directory).returncode == 0
    jobs = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60,
                         what="the job on PostgreSQL")
    assert jobs[0]["series_instance_uid"] == w.series_instance_uid
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == 20
    assert not (node.store_root / "spine-node.db").exists()
    assert node.stop() == 0


def test_job_running_at_kill9_is_requeued_and_finished_after_restart(node_factory, tmp_path):
    from tests.helpers import write_config
    node = node_factory(pipeline={"entry_point": "tests.dicom_node.fake_pipeline:slow_analyse"})
    node.start()
    w = write_ct_series(tmp_path / "ct", n_slices=20, rows=16, columns=16)
    assert storescu(node, w.directory).returncode == 0
    node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "running"], timeout=60,
                  what="the job to start")
    node.kill9()
    assert [j["state"] for j in _jobs(node)] == ["running"]  # as the crash left it
    node.config["pipeline"] = dict(FAKE_PIPELINE)
    write_config(node.config_path, node.config)
    node.start()
    [job] = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"],
                          timeout=60, what="the re-queued job to finish")
    assert job["attempts"] == 2
    assert "recovered after an unclean stop" in node.log()
