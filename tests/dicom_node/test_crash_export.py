"""``kill -9`` of ``spine-node serve`` in the middle of a delivery (issue 7, "Crashes").

The worst moment: the PACS has accepted an object, the node dies before it hears the answer.
A relay in front of a real Orthanc stores each object into Orthanc (REST) and then holds its
C-STORE response; the node is killed while the first answer is held. After the restart the
deliveries are due at once (not after their lease), every result reaches Orthanc, and Orthanc
holds each SOP Instance UID exactly once: delivery is at-least-once (the held object is sent
again, as the relay's counts show) and the receiver is idempotent because result UIDs are
deterministic per job version (a PACS keeps one instance per SOP Instance UID).
"""
from __future__ import annotations

import io
import threading
import time
import urllib.request
from collections import Counter

import pytest
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from config import load_settings
from tests.dicom_node.test_exporter import FAST_RETRY, Node
from tests.helpers import free_port
from tests.helpers import synthetic_results as synth
from tests.helpers.orthanc_server import Orthanc

pytestmark = pytest.mark.integration

RESULT_CLASSES = ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34",
                  "1.2.840.10008.5.1.4.1.1.7"]


class Relay:
    """A DICOM SCP that puts every object into Orthanc and then, while ``hold`` is set, keeps
    its C-STORE response back until released."""

    def __init__(self, orthanc: Orthanc):
        self.orthanc = orthanc
        self.port = free_port()
        self.hold = threading.Event()
        self.release = threading.Event()
        self.forwarded = threading.Event()
        self.sent: Counter[str] = Counter()
        ae = AE(ae_title="RELAY")
        for uid in RESULT_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        req = urllib.request.Request(self.orthanc.url + "/instances", data=buf.getvalue(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30):
            pass
        self.sent[str(ds.SOPInstanceUID)] += 1
        self.forwarded.set()
        if self.hold.is_set():
            self.release.wait(60)  # the PACS has it; the answer never reaches the node
        return 0x0000

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_kill9_while_the_pacs_answers_delivers_each_result_exactly_once(
        tmp_path, node_factory):
    orthanc = Orthanc(root=tmp_path / "orthanc").start()
    relay = Relay(orthanc)
    try:
        paths, _study, _series = synth.write_series(tmp_path / "ct")
        series = synth.load(paths)
        analysed = (series, synth.analysis(series))
        node = node_factory(destinations=[{"name": "pacs", "ae_title": "RELAY",
                                           "host": "127.0.0.1", "port": relay.port}],
                            exporter=FAST_RETRY)
        helper = Node(load_settings(node.config_path))   # the worker's side: results + rows
        try:
            published = helper.publish(analysed)
            uids = [o.sop_instance_uid for o in published.objects]
            relay.hold.set()
            node.start()
            assert relay.forwarded.wait(60), "the node never sent anything\n" + node.log()
            node.kill9()                                 # Orthanc has it; no answer was heard
            relay.hold.clear()
            relay.release.set()
            study = series.study_instance_uid
            assert set(helper.states(study)) == {"pending"}
            t0 = time.monotonic()
            node.start()
            node.wait_for(lambda: helper.states(study) == ["delivered"] * 3, timeout=60,
                          what="every delivery delivered after the restart")
            # Promptly: the restart released the dead process's lease (minutes otherwise).
            assert time.monotonic() - t0 < 30
            assert "deliveries_released" in node.log()
        finally:
            helper.close()
        # Orthanc holds each result once, although one was sent twice.
        assert orthanc.instance_count() == 3
        for uid in uids:
            hits = [h for h in orthanc.post("/tools/lookup", uid) if h["Type"] == "Instance"]
            assert len(hits) == 1, (uid, hits)
        assert set(relay.sent) == set(uids)
        assert max(relay.sent.values()) == 2 and sum(relay.sent.values()) == 4, relay.sent
    finally:
        relay.stop()
        orthanc.stop()
