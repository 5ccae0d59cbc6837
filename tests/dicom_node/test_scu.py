"""The C-STORE SCU (dicom_node/scu.py): contexts per SOP class, statuses, bounded waits."""
from __future__ import annotations

import socket
import time

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.scu import Peer, StoreError, Timeouts, store_files
from pipeline.outputs import build_outputs
from tests.helpers import free_port
from tests.helpers import synthetic_results as synth

FAST = Timeouts(connect_s=2, acse_s=2, dimse_s=10, network_s=10)


@pytest.fixture(scope="module")
def result_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    paths, _study, _series = synth.write_series(tmp / "ct")
    series = synth.load(paths)
    out = build_outputs(series, synth.analysis(series))
    files = []
    for kind, ds in out.items():
        ds.save_as(tmp / f"{kind.value}.dcm", enforce_file_format=True)
        files.append(tmp / f"{kind.value}.dcm")
    return files


def _scp(status: int = 0x0000, syntax=ImplicitVRLittleEndian, sop_classes=None):
    got = []

    def on_store(event):
        got.append((event.request.AffectedSOPClassUID, event.context.transfer_syntax))
        return status

    ae = AE("TESTSCP")
    for cx in StoragePresentationContexts:
        if sop_classes is None or cx.abstract_syntax in sop_classes:
            ae.add_supported_context(cx.abstract_syntax, syntax)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, Peer("TESTSCP", "127.0.0.1", port), got


def test_seg_sr_and_sc_reach_a_peer_that_only_takes_implicit_vr(result_files):
    server, peer, got = _scp()
    try:
        outcomes = store_files(result_files, peer, calling_ae="SPINENODE", timeouts=FAST)
    finally:
        server.shutdown()
    assert [o.ok for o in outcomes] == [True, True, True]
    assert [sop for sop, _ in got] == ["1.2.840.10008.5.1.4.1.1.66.4",
                                       "1.2.840.10008.5.1.4.1.1.88.34",
                                       "1.2.840.10008.5.1.4.1.1.7"]
    assert {ts for _, ts in got} == {ImplicitVRLittleEndian}


def test_failure_status_and_unsupported_sop_class_are_failed_outcomes(result_files):
    server, peer, _ = _scp(status=0xA700, sop_classes={"1.2.840.10008.5.1.4.1.1.66.4",
                                                       "1.2.840.10008.5.1.4.1.1.7"})
    try:
        seg, sr, key = store_files(result_files, peer, calling_ae="SPINENODE", timeouts=FAST)
    finally:
        server.shutdown()
    assert not seg.ok and seg.status == 0xA700 and "0xA700" in seg.error
    assert not sr.ok and sr.status is None and "does not accept" in sr.error
    assert not key.ok


def test_a_peer_that_never_answers_costs_at_most_the_acse_timeout(result_files):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        peer = Peer("HUNG", "127.0.0.1", srv.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="did not accept the association within 2 s"):
            store_files(result_files, peer, calling_ae="SPINENODE", timeouts=FAST)
        assert time.monotonic() - t0 < 8


def test_nothing_listening_is_a_clear_refusal(result_files):
    with pytest.raises(StoreError, match="connection refused"):
        store_files(result_files, Peer("NOBODY", "127.0.0.1", free_port()),
                    calling_ae="SPINENODE", timeouts=FAST)
