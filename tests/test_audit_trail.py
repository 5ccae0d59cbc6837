"""The audit trail of an end-to-end run (issue 7, "Audit"): a phantom study sent by dcmtk
``storescu`` to ``spine-node serve``, analysed (the phantom's ground truth stands in for the
models), delivered to a real Orthanc and dead-lettered at a destination that never answers;
an intruder's association rejected; admin actions from the command line.

- every step is an append-only ``audit_events`` row and a JSON log line shaped for IHE ATNA
  (event id, action, outcome, actor, the study as participant object);
- the phantom's patient name and ID appear in no log line and nowhere in the database.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import text

from storage.db import Database
from tests.helpers import DCMTK_ENV, REPO, dcmtk, free_port, storescu
from tests.helpers.orthanc_server import Orthanc

pytestmark = pytest.mark.integration

SEED = 5
PATIENT_NAME, PATIENT_ID = f"PHANTOM^SEED{SEED}", f"PH{SEED:08d}"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    res = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--seed", str(SEED),
                          "--out", str(out), "--levels", "T12-L2"], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def test_end_to_end_run_is_audited_without_patient_identifiers(node_factory, phantom,
                                                               tmp_path):
    import pydicom
    first = pydicom.dcmread(next((phantom / "dicom").iterdir()), stop_before_pixels=True)
    assert (str(first.PatientName), first.PatientID) == (PATIENT_NAME, PATIENT_ID)
    study = str(first.StudyInstanceUID)

    orthanc = Orthanc(root=tmp_path / "orthanc").start()
    try:
        node = node_factory(
            node={"allowed_calling_aes": ["STORESCU", "SPINENODE"]},
            pipeline={"entry_point": "tests.deploy.groundtruth_pipeline:analyse"},
            exporter={"backoff_start_s": 0.2, "backoff_factor": 1.0, "backoff_max_s": 0.2,
                      "max_attempts": 2, "poll_seconds": 0.2, "acse_timeout_s": 3.0},
            destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                           "port": orthanc.dicom_port},
                          {"name": "gone", "ae_title": "NOBODY", "host": "127.0.0.1",
                           "port": free_port()}])
        node.env["GROUND_TRUTH_PHANTOM_DIR"] = str(phantom)
        node.start()
        res = storescu(node, phantom / "dicom")
        assert res.returncode == 0, res.stdout + res.stderr
        intruder = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", node.ae_title,
                                   "127.0.0.1", str(node.port)], capture_output=True,
                                  env=DCMTK_ENV, timeout=30)
        assert intruder.returncode != 0

        def settled():
            rows = _rows(node, "SELECT destination, state FROM deliveries")
            states = sorted(set(rows))
            return states if states == [("gone", "dead"), ("pacs", "delivered")] else None

        node.wait_for(settled, timeout=240, interval=1.0, what="delivered and dead-lettered")
        assert orthanc.instance_count() == 3
        resend = node.cli("resend", study)
        # The record goes to the audit table (below), not to the user's terminal.
        assert '"audit"' not in resend.stdout + resend.stderr
        assert PATIENT_NAME not in resend.stdout + resend.stderr
        node.cli("echo", f"{node.ae_title}@127.0.0.1:{node.port}")
        assert node.stop() == 0
    finally:
        orthanc.stop()

    # The audit table: every step, ATNA-shaped, the study as the participant object.
    events = [(t, o, json.loads(d) if isinstance(d, str) else d) for t, o, d in
              _rows(node, "SELECT event_type, outcome, details FROM audit_events ORDER BY id")]
    seen = {(t, o) for t, o, _ in events}
    for expected in [("node_started", "success"), ("association", "accepted"),
                     ("association", "rejected"), ("instances_received", "success"),
                     ("study_received", "success"), ("job_started", "success"),
                     ("job_finished", "done"), ("result_delivered", "success"),
                     ("result_dead", "dead"), ("resend", "success"), ("echo", "success"),
                     ("node_stopped", "success")]:
        assert expected in seen, (expected, sorted(seen))
    for t, _o, d in events:
        assert d["atna_event_id"].startswith("110") and d["atna_action"] in "CRUDE", (t, d)
        assert d["atna_outcome"] in (0, 4, 8, 12)
        if t in ("study_received", "job_started", "job_finished", "result_delivered",
                 "result_dead", "resend"):
            assert d["study_instance_uid"] == study, (t, d)
    # (3 each at least: the resend may already have gone out again before the stop)
    assert sum(1 for t, o, _ in events if t == "result_delivered") >= 3
    assert sum(1 for t, o, _ in events if t == "result_dead") >= 3

    # The node's log: JSON lines, the same events, no patient name or ID anywhere.
    log = node.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    audited = {(x["event"], x["outcome"]) for x in lines if x.get("audit")}
    assert {("association", "rejected"), ("job_finished", "done"),
            ("result_delivered", "success"), ("result_dead", "dead"),
            ("study_received", "success")} <= audited, audited
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.replace("^", " ")):
        assert secret not in log
    db_bytes = b"".join(p.read_bytes() for p in node.store_root.glob("spine-node.db*"))
    for secret in (PATIENT_NAME, PATIENT_ID):
        assert secret.encode() not in db_bytes
    # The append-only table refuses to be rewritten.
    db = Database(f"sqlite:///{node.store_root}/spine-node.db")
    try:
        with pytest.raises(Exception, match="append-only"):
            with db.engine.begin() as conn:
                conn.execute(text("UPDATE audit_events SET outcome = 'forged'"))
    finally:
        db.dispose()


def _rows(node, sql: str) -> list[tuple]:
    db = Database(f"sqlite:///{node.store_root}/spine-node.db")
    try:
        with db.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    except Exception:  # noqa: BLE001 - not created yet
        return []
    finally:
        db.dispose()
