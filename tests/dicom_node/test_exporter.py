"""Results reach a real Orthanc by C-STORE, with retries that need nobody (issue 6).

Each test starts its own Orthanc on loopback (tests/helpers/orthanc_server.py) and publishes the
results of a hand-made analysis of a small synthetic CT series (tests/helpers/synthetic_results.py)
through :func:`dicom_node.results.publish`, then lets :class:`dicom_node.exporter.Exporter`
deliver them.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from config import load_settings
from dicom_node.exporter import Exporter
from dicom_node.results import publish
from storage.db import Database
from storage.deliveries import DeliveryQueue
from storage.files import BlobStore
from storage.index import Index
from storage.models import Job, JobState, Series, Study
from storage.queue import JobRef
from tests.helpers import free_port, wait_for
from tests.helpers import synthetic_results as synth
from tests.helpers.orthanc_server import Orthanc

pytestmark = pytest.mark.integration

FAST_RETRY = {"backoff_start_s": 0.3, "backoff_factor": 2.0, "backoff_max_s": 1.0,
              "max_attempts": 1000, "poll_seconds": 0.2, "acse_timeout_s": 2.0,
              "dimse_timeout_s": 10.0}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    paths, _study, _series = synth.write_series(tmp_path_factory.mktemp("ct"))
    series = synth.load(paths)
    return series, synth.analysis(series)


class Node:
    """The parts of a node the exporter needs: settings, database, store."""

    def __init__(self, settings):
        self.settings = settings
        self.open()

    @classmethod
    def make(cls, root: Path, destinations: list[dict], **exporter) -> "Node":
        return cls(load_settings(
            None, node={"ae_title": "SPINENODE", "port": free_port()},
            storage={"root": str(root / "store"), "min_free_mb": 0, "fsync": False},
            exporter={**FAST_RETRY, **exporter}, destinations=destinations))

    def open(self) -> None:
        """(Re)open the database and store, as a restarted process would."""
        self.db = Database(self.settings.storage.database_url)
        self.db.upgrade()
        self.index = Index(self.db)
        self.store = BlobStore(self.settings.storage.root, fsync=False)
        self.deliveries = DeliveryQueue(self.db)

    def close(self) -> None:
        self.db.dispose()

    def job(self, series, version: int = 1) -> JobRef:
        with self.db.session() as s, s.begin():
            study = s.query(Study).filter_by(study_instance_uid=series.study_instance_uid) \
                .one_or_none()
            if study is None:
                study = Study(study_instance_uid=series.study_instance_uid)
                s.add(study)
                s.flush()
            row = s.query(Series).filter_by(series_instance_uid=series.series_instance_uid) \
                .one_or_none()
            if row is None:
                row = Series(study_id=study.id, series_instance_uid=series.series_instance_uid,
                             modality="CT")
                s.add(row)
                s.flush()
            job = Job(series_id=row.id, study_instance_uid=series.study_instance_uid,
                      series_instance_uid=series.series_instance_uid, version=version,
                      state=JobState.RUNNING.value, attempts=1)
            s.add(job)
            s.flush()
            return JobRef(job.id, row.id, job.study_instance_uid, job.series_instance_uid,
                          version, 1)

    def publish(self, analysed, version: int = 1):
        series, result = analysed
        return publish(job=self.job(series, version), series=series, result=result,
                       index=self.index, store=self.store, settings=self.settings)

    def exporter(self) -> Exporter:
        return Exporter(self.settings, self.db, self.store).start()

    def states(self, study_uid: str, destination: str | None = None) -> list[str]:
        return [r["state"] for r in self.deliveries.for_study(study_uid)
                if destination is None or r["destination"] == destination]


@pytest.fixture
def orthancs(tmp_path):
    started: list[Orthanc] = []

    def make(name: str = "pacs", **kw) -> Orthanc:
        o = Orthanc(root=tmp_path / f"orthanc-{name}", **kw)
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


@pytest.fixture
def hanging_peer():
    """A TCP listener that accepts associations and never answers (a hung PACS)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], held
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def _dest(name: str, orthanc_or_port, ae: str = "ORTHANC", objects=None) -> dict:
    port = orthanc_or_port.dicom_port if isinstance(orthanc_or_port, Orthanc) else orthanc_or_port
    d = {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port}
    if objects is not None:
        d["objects"] = objects
    return d


def test_seg_sr_and_key_image_arrive_in_orthanc(tmp_path, analysed, orthancs):
    pacs = orthancs("pacs").start()
    node = Node.make(tmp_path, [_dest("pacs", pacs)])
    exporter = node.exporter()
    try:
        published = node.publish(analysed)
        uids = {o.kind: o.sop_instance_uid for o in published.objects}
        wait_for(lambda: pacs.has(*uids.values()), 60, "SEG, SR and key image in Orthanc",
                 lambda: f"{node.deliveries.for_study(analysed[0].study_instance_uid)}\n"
                         f"{pacs.log()}")
        wait_for(lambda: node.states(analysed[0].study_instance_uid) == ["delivered"] * 3, 10,
                 "deliveries marked delivered")
    finally:
        exporter.stop()
        node.close()
    source = analysed[0]
    expected_class = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "sr": "1.2.840.10008.5.1.4.1.1.88.34",
                      "key_image": "1.2.840.10008.5.1.4.1.1.7"}
    for kind, uid in uids.items():
        tags = pacs.tags(uid)
        assert tags["SOPClassUID"] == expected_class[kind], kind
        assert tags["StudyInstanceUID"] == source.study_instance_uid, kind
        assert tags["SeriesInstanceUID"] != source.series_instance_uid, kind
        assert tags["SeriesDescription"].startswith("spine-node v1 "), kind
        assert tags["PatientID"] == str(source.headers[0].PatientID), kind


def test_destination_down_while_the_job_finishes_gets_everything_once_up_across_a_restart(
        tmp_path, analysed, orthancs):
    pacs = orthancs("pacs")                        # configured, not running yet
    node = Node.make(tmp_path, [_dest("pacs", pacs)])
    exporter = node.exporter()
    study = analysed[0].study_instance_uid
    try:
        published = node.publish(analysed)
        wait_for(lambda: all(r["attempts"] >= 2 for r in node.deliveries.for_study(study)), 30,
                 "failed attempts against the stopped destination",
                 lambda: str(node.deliveries.for_study(study)))
        rows = node.deliveries.for_study(study)
        assert {r["state"] for r in rows} == {"pending"}
        assert all(r["last_error"] for r in rows)
    finally:
        exporter.stop()
        node.close()
    # The node restarts (a new database connection, a new exporter) and the PACS comes up;
    # nobody resends anything.
    pacs.start()
    node.open()
    exporter = node.exporter()
    try:
        uids = [o.sop_instance_uid for o in published.objects]
        wait_for(lambda: pacs.has(*uids), 60, "results in Orthanc after it came up",
                 lambda: str(node.deliveries.for_study(study)))
        wait_for(lambda: node.states(study) == ["delivered"] * 3, 10, "delivered rows")
    finally:
        exporter.stop()
        node.close()


def test_refusing_or_hanging_destinations_block_neither_the_worker_nor_the_others(
        tmp_path, analysed, orthancs, hanging_peer):
    hang_port, held = hanging_peer
    pacs = orthancs("pacs", check_called_aet=True).start()
    node = Node.make(tmp_path, [
        _dest("hung", hang_port, ae="HUNG"),
        _dest("refusing", pacs, ae="NOTORTHANC"),        # Orthanc rejects the called AE
        _dest("closed", free_port(), ae="NOBODY"),        # nothing listens: refused at once
        _dest("pacs", pacs),
        _dest("keyonly", pacs, objects=["key_image"]),
    ], max_attempts=3, backoff_start_s=0.2)
    exporter = node.exporter()
    study = analysed[0].study_instance_uid
    try:
        # The worker's side: publishing only writes files and rows, whatever the peers do.
        t0 = time.monotonic()
        published = node.publish(analysed, version=1)
        wait_for(lambda: held, 10, "the hung peer to be called")
        published2 = node.publish(analysed, version=2)
        assert time.monotonic() - t0 < 15
        uids = [o.sop_instance_uid for o in published.objects + published2.objects]
        # The good destination gets everything while the hung one is still hanging.
        wait_for(lambda: pacs.has(*uids), 60, "results in the working Orthanc",
                 lambda: str(node.deliveries.for_study(study)))
        keyonly = [r for r in node.deliveries.for_study(study) if r["destination"] == "keyonly"]
        assert [r["kind"] for r in keyonly] == ["key_image", "key_image"]
        # Refusals and time-outs end dead after max_attempts, with the reason.
        for name, reason in (("refusing", "rejected"), ("closed", "connection refused"),
                             ("hung", "did not accept the association within 2 s")):
            wait_for(lambda n=name: set(node.states(study, n)) == {"dead"}, 60,
                     f"{name} deliveries dead", lambda: str(node.deliveries.for_study(study)))
            rows = [r for r in node.deliveries.for_study(study) if r["destination"] == name]
            # On a loaded machine Orthanc's rejection can come after the 2 s ACSE timeout:
            # either way the delivery ends dead with a reason that says what happened.
            reasons = (reason, "did not accept the association") if name == "refusing" else (reason,)
            assert all(any(x in r["last_error"] for x in reasons) and r["attempts"] == 3
                       for r in rows), [(r["id"], r["attempts"], r["last_error"]) for r in rows]
        assert set(node.states(study, "pacs")) == {"delivered"}
    finally:
        exporter.stop(timeout_s=5)
        node.close()


def test_serve_delivers_what_was_queued_while_the_pacs_was_down_even_after_kill_9(
        tmp_path, analysed, orthancs, node_factory):
    """The exporter inside ``spine-node serve``: results recorded (as the worker does) while
    the PACS is down are delivered once it is up, after the node was killed and restarted."""
    pacs = orthancs("pacs")
    node = node_factory(destinations=[_dest("pacs", pacs)], exporter=FAST_RETRY)
    helper = Node(load_settings(node.config_path))     # the worker's view of the same node
    study = analysed[0].study_instance_uid
    try:
        published = helper.publish(analysed)
        node.start()
        node.wait_for(lambda: all(r["attempts"] >= 1 for r in helper.deliveries.for_study(study)),
                      timeout=60, what="attempts by the node's exporter")
        node.kill9()
        pacs.start()
        node.start()
        uids = [o.sop_instance_uid for o in published.objects]
        node.wait_for(lambda: pacs.has(*uids), timeout=60, what="results in Orthanc")
        node.wait_for(lambda: helper.states(study) == ["delivered"] * 3, timeout=20,
                      what="delivered rows")
        status, body = node.http_get("/metrics")
        assert status == 200 and b'spine_node_deliveries_by_state{state="delivered"} 3.0' in body
    finally:
        helper.close()
