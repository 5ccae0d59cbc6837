"""dicom_node.fastpath.hooks: the storage SCP's associations with the fast path receive what
pynetdicom's receive, and answer as pynetdicom answers.

A plain pynetdicom AE on the node's listener (:func:`dicom_node.acceptors.start_server`,
``fast_path=True``) serves a pynetdicom SCU or dcmtk ``storescu``: its handlers see the data sets
and statuses they would see with stock pynetdicom. Waits end on their wake-up, not on a
timeout; C-STOREs are served in the DUL thread only when that keeps the order; real transfers
with small PDUs (a data set in ~50 fragments, a header beyond the first 64 KiB) reach the node's
store byte for byte on both paths (``node.fast_path`` true and false).
"""
from __future__ import annotations

import logging
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification

from dicom_node.acceptors import start_server
from dicom_node.fastpath import codec, hooks
from dicom_node.fastpath.hooks import SCPDIMSE, SCPDUL
from tests.helpers import DCMTK_ENV, dcmtk, storescu

SLOW_TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def _quiet_pynetdicom():
    """pynetdicom's logger at WARNING, as the node keeps it (dicom_node.logging): its standard
    log handlers are then unbound from the SCP's associations, as in the node."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def _fast_server(ae: AE, handlers: list):
    server = start_server(ae, ("127.0.0.1", 0), evt_handlers=handlers, fast_path=True)
    assert server.fast_path, "pynetdicom is not a tested version: the fast path is off"
    return server


# -- waits ---------------------------------------------------------------------------------------
def test_echo_release_and_abort_are_not_held_by_the_wait_timeout(monkeypatch):
    """The SCP's DUL reactor waits up to ``DUL_WAIT_S`` in ``select()``; whatever it must act on
    (a PDU to send, a stop or kill) wakes it. Here the timeout is raised to 5 s: a missing
    wake-up on any step (the C-ECHO response, the release, the end of both reactors) would
    make the exchange take at least 5 s; with the wake-ups it takes milliseconds."""
    monkeypatch.setattr(hooks, "DUL_WAIT_S", SLOW_TIMEOUT_S)
    scp = AE(ae_title="FASTDULSCP")
    scp.add_supported_context(Verification)
    echoes = []
    server = _fast_server(scp, [(evt.EVT_C_ECHO, lambda e: echoes.append(1) or 0)])
    try:
        port = server.server_address[1]
        scu = AE(ae_title="FASTDULSCU")
        scu.add_requested_context(Verification)
        start = time.monotonic()
        assoc = scu.associate("127.0.0.1", port, ae_title="FASTDULSCP")
        assert assoc.is_established
        [acceptor] = server.active_associations
        assert type(acceptor.dul) is SCPDUL
        for _ in range(3):
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released
        acceptor.join(timeout=2 * SLOW_TIMEOUT_S)
        acceptor.dul.join(timeout=2 * SLOW_TIMEOUT_S)
        assert not acceptor.dul.is_alive()
        # An abort ends the acceptor's side too.
        assoc2 = scu.associate("127.0.0.1", port, ae_title="FASTDULSCP")
        assert assoc2.is_established
        assoc2.abort()
        assert assoc2.is_aborted
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 2 * SLOW_TIMEOUT_S
        while scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        server_side_closed = time.monotonic() - start
    finally:
        server.shutdown()
    assert echoes == [1, 1, 1]
    # Each step above would wait out the 5 s timeout without its wake-up.
    assert elapsed < SLOW_TIMEOUT_S / 2, elapsed
    assert server_side_closed < SLOW_TIMEOUT_S, server_side_closed


def test_recv_does_not_allocate_what_a_pdu_header_only_announces():
    """A peer's PDU header may announce up to 4 GiB; the read must not reserve it up front
    (a hostile header would otherwise cost that much memory before any byte arrives)."""
    a, b = socket.socketpair()
    try:
        payload = bytes(range(256)) * 12_000           # 3 MB: grows past the first buffer

        def send():
            b.sendall(payload)
            b.close()

        sender = threading.Thread(target=send)
        tracemalloc.start()
        sender.start()
        got = hooks.recv_exactly(a, 2**31)              # announced 2 GiB, 3 MB then closed
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sender.join(timeout=10)
    finally:
        a.close()
    assert bytes(got) == payload
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a 3 MB read"


# -- data sets received ------------------------------------------------------------------------
def _files(directory: Path, count: int, private_bytes: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
        if private_bytes:
            ds.add_new(0x00190010, "LO", "PRIVATE")
            ds.add_new(0x00191010, "OB", bytes(range(256)) * (private_bytes // 256))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 256, 256, 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes((k + i) % 251 for i in range(256 * 256 * 2))
        path = directory / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _data_set_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    (group_length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + group_length:]


def test_small_pdus_reach_a_pynetdicom_handler_intact(tmp_path, monkeypatch):
    """A plain pynetdicom AE on the fast path's listener: ``event.dataset`` and
    ``event.encoded_dataset()`` see what storescu sent, in 4 KiB PDUs, through the fast path
    (counted); a pynetdicom SCU reads the directly encoded responses."""
    calls = {"pdus": 0, "responses": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(codec, "parse_p_data_tf", counted("pdus", codec.parse_p_data_tf))
    monkeypatch.setattr(codec, "c_store_rsp_command",
                        counted("responses", codec.c_store_rsp_command))
    files = _files(tmp_path / "series", 3, private_bytes=70_000)
    got: dict[str, tuple[bytes, Dataset]] = {}

    def on_store(event):
        ds = event.dataset
        got[ds.SOPInstanceUID] = (event.encoded_dataset(), ds)
        return 0x0000

    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = _fast_server(ae, [(evt.EVT_C_STORE, on_store)])
    try:
        res = subprocess.run([dcmtk("storescu"), "-aec", "PLAINSCP", "--max-send-pdu", "4096",
                              "-xe", "127.0.0.1", str(server.server_address[1]),
                              *map(str, files)], capture_output=True, text=True,
                             env=DCMTK_ENV, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert calls["pdus"] > 3 * 40 and calls["responses"] == 3
        scu = AE(ae_title="PLAINSCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="PLAINSCP")
        assert assoc.is_established
        rsp = assoc.send_c_store(files[0])
        assert rsp.Status == 0x0000 and calls["responses"] == 4
        assoc.release()
    finally:
        server.shutdown()
    assert len(got) == 3
    for path in files:
        sent = pydicom.dcmread(path)
        encoded, ds = got[sent.SOPInstanceUID]
        assert ds.PixelData == sent.PixelData and ds[0x00191010].value == sent[0x00191010].value
        assert pydicom.dcmread(BytesIO(encoded)).PixelData == sent.PixelData


@pytest.mark.parametrize("pdu", ["4096", "131072"])
def test_node_stores_what_storescu_sent_byte_for_byte(node_factory, tmp_path, pdu, fast_path):
    """The node writes the fragments as they came (writev): each stored file is the Part 10
    prefix plus exactly the data set bytes of the sent file; a header beyond the first 64 KiB
    (a large private element) is found too. Both receive paths."""
    node = node_factory(node={"fast_path": fast_path}).start()
    files = (_files(tmp_path / "plain", 4)
             + _files(tmp_path / "private", 2, private_bytes=80_000))
    res = storescu(node, files, "--max-send-pdu", pdu, "-xe")
    assert res.returncode == 0, res.stdout + res.stderr
    for path in files:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        stored = (node.store_root / "instances" / sent.StudyInstanceUID
                  / sent.SeriesInstanceUID / f"{sent.SOPInstanceUID}.dcm")
        assert _data_set_bytes(stored) == _data_set_bytes(path)
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("kind,pdu", [
    # waits out the network timeout (about 10 s): slow
    pytest.param("item-overflow", struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IB", 50, 1) + b"\x03x",
                 marks=pytest.mark.slow),
    ("item-short", struct.pack(">BBI", 0x04, 0, 4) + struct.pack(">I", 1)),
    ("announces-2GiB", struct.pack(">BBI", 0x04, 0, 2**31) + b"\x00" * 64),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_p_data_aborts_that_association_only(node_factory, tmp_path, kind, pdu,
                                                      fast_path):
    """A broken P-DATA-TF PDU on an established association: the node aborts it (or, for a
    header that announces 2 GiB and sends 64 bytes, waits for the rest without reserving it:
    the old read took ~2 GB of RSS here), and goes on storing for everyone else. Both receive
    paths."""
    node = node_factory(node={"fast_path": fast_path}).start()
    rss_before = _rss_mb(node.proc.pid)
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    scu.network_timeout = scu.acse_timeout = 10
    assoc = scu.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assoc.dul.socket.send(pdu)
    if kind == "announces-2GiB":
        time.sleep(1.0)
        assert _rss_mb(node.proc.pid) < rss_before + 256
        assoc.abort()
    else:
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted, "the node did not abort the association"
    files = _files(tmp_path / "after", 2)
    res = storescu(node, files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list(node.store_root.rglob("*.dcm"))) == 2


# -- C-STORE served in the DUL thread --------------------------------------------------------
class _FakeAssoc:
    """What ``SCPDIMSE._serve_inline`` looks at on its association."""

    def __init__(self, fail: bool = False):
        self._serving = False
        self._reactor_running = True
        self._sent_release = False
        self._accepted_cx = {5: object()}
        self.dimse = SCPDIMSE(self)
        self.dul = SimpleNamespace(_idle_timer=SimpleNamespace(restart=lambda: None))
        self.served: list[tuple[object, int, bool]] = []
        self.aborted: list[bool] = []
        self.fail = fail

    def _serve_request(self, primitive, context_id):
        self.served.append((primitive, context_id, self._serving))
        if self.fail:
            raise RuntimeError("boom")

    def abort(self, block: bool = True) -> None:
        self.aborted.append(block)


def _store_request() -> C_STORE:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = "1.2.3"
    req.Priority = 0
    return req


def test_a_c_store_is_served_in_the_dul_thread_only_when_that_keeps_the_order(monkeypatch):
    monkeypatch.setattr(SCPDIMSE, "lean_store", False)   # the fake serves it itself
    req = _store_request()
    assoc = _FakeAssoc()
    assert assoc.dimse._serve_inline(req, 5)
    assert assoc.served == [(req, 5, True)] and assoc._serving is False

    declined = []
    queued = _FakeAssoc()
    queued.dimse.msg_queue.put((5, "an earlier request"))   # not yet taken
    declined.append(queued)
    serving = _FakeAssoc()
    serving._serving = True                                 # the association thread serves one
    declined.append(serving)
    negotiating = _FakeAssoc()
    negotiating._reactor_running = False                    # not established yet
    declined.append(negotiating)
    releasing = _FakeAssoc()
    releasing._sent_release = True
    declined.append(releasing)
    for other in declined:
        assert not other.dimse._serve_inline(req, 5) and not other.served
    assert not _FakeAssoc().dimse._serve_inline(req, 3)           # unknown context
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert not _FakeAssoc().dimse._serve_inline(echo, 5)          # not a C-STORE
    rsp = _store_request()
    rsp.MessageIDBeingRespondedTo = 1
    assert not _FakeAssoc().dimse._serve_inline(rsp, 5)           # a response
    monkeypatch.setattr(SCPDIMSE, "inline_store", False)
    assert not _FakeAssoc().dimse._serve_inline(req, 5)           # not asked for


def test_a_failure_while_serving_in_the_dul_thread_aborts_without_waiting(monkeypatch):
    """What would have ended the association thread: logged, the association aborted
    without blocking (the DUL thread itself must send the A-ABORT), the flag cleared."""
    monkeypatch.setattr(SCPDIMSE, "lean_store", False)
    assoc = _FakeAssoc(fail=True)
    assert assoc.dimse._serve_inline(_store_request(), 5)
    assert assoc.aborted == [False] and assoc._serving is False


def test_the_storage_scp_serves_c_store_in_the_dul_thread_and_c_echo_in_its_own(tmp_path):
    """A pynetdicom AE on the fast path's listener: each C-STORE handler runs in the DUL
    thread of its association, a C-ECHO in the association thread; a pynetdicom SCU gets
    every answer."""
    threads: dict[str, list] = {"store": [], "echo": []}

    def on_store(event):
        threads["store"].append(threading.current_thread())
        return 0x0000

    def on_echo(event):
        threads["echo"].append(threading.current_thread())
        return 0x0000

    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    server = _fast_server(ae, [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)])
    try:
        files = _files(tmp_path / "series", 3)
        scu = AE(ae_title="PLAINSCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="PLAINSCP")
        assert assoc.is_established
        statuses = []
        for path in files:
            statuses.append(assoc.send_c_store(path).Status)
            statuses.append(assoc.send_c_echo().Status)
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000] * 6
    assert len(threads["store"]) == 3 and len(threads["echo"]) == 3
    assert all(isinstance(t, SCPDUL) for t in threads["store"])
    assert not any(isinstance(t, SCPDUL) for t in threads["echo"])


def _serve_with(tmp_path, monkeypatch, on_store, *, lean: bool, extra_handlers=(),
                count: int = 2):
    """C-STOREs from a pynetdicom SCU to a pynetdicom AE on the fast path's listener: the
    response command sets the SCU decoded, the responses the SCP's DIMSE provider's
    ``send_msg`` sent, and the context IDs of those the lean service wrote to the socket
    itself."""
    monkeypatch.setattr(SCPDIMSE, "lean_store", lean)
    sent_by_send_msg = []
    orig = SCPDIMSE.send_msg

    def send_msg(dimse, primitive, cx):
        sent_by_send_msg.append(primitive)
        return orig(dimse, primitive, cx)

    monkeypatch.setattr(SCPDIMSE, "send_msg", send_msg)
    direct = []
    real_pdata = codec.p_data_tf_command
    monkeypatch.setattr(codec, "p_data_tf_command",
                        lambda cx, command: (direct.append(cx), real_pdata(cx, command))[1])
    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = _fast_server(ae, [(evt.EVT_C_STORE, on_store), *extra_handlers])
    try:
        scu = AE(ae_title="PLAINSCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        received = []   # the response command sets, as the SCU decoded them
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="PLAINSCP",
                              evt_handlers=[(evt.EVT_DIMSE_RECV, lambda event: received.append(
                                  event.message.command_set))])
        assert assoc.is_established
        statuses = [assoc.send_c_store(path) for path in _files(tmp_path / "s", count)]
        assoc.release()
    finally:
        server.shutdown()
    assert [c.Status for c in received] == [s.Status for s in statuses]
    return received, sent_by_send_msg, direct


@pytest.mark.parametrize("lean", [True, False])
def test_the_lean_store_service_answers_as_pynetdicom_does(tmp_path, monkeypatch, lean):
    """The status a handler returns reaches the SCU, with the request's UIDs and message ID;
    with the lean service as one PDU written by the DUL thread itself, without it through
    pynetdicom's service class (the same answer)."""
    seen = []

    def on_store(event):
        seen.append((event.request.AffectedSOPInstanceUID, event.request.MessageID))
        return 0xB000 if len(seen) == 2 else 0x0000

    responses, by_send_msg, direct = _serve_with(tmp_path, monkeypatch, on_store, lean=lean)
    assert [r.Status for r in responses] == [0x0000, 0xB000]
    assert [(str(r.AffectedSOPInstanceUID), r.MessageIDBeingRespondedTo)
            for r in responses] == seen
    assert all(r.AffectedSOPClassUID == CTImageStorage for r in responses)
    assert all(r.CommandField == 0x8001 and r.CommandDataSetType == 0x0101
               for r in responses)
    if lean:
        assert len(direct) == 2 and not by_send_msg
    else:
        assert not direct and len(by_send_msg) == 2


def test_the_lean_store_service_keeps_pynetdicoms_answers_to_unusual_handlers(tmp_path,
                                                                             monkeypatch):
    """A status Dataset (with an Error Comment) goes through pynetdicom's validation and
    encoding; a handler that raises is answered 0xC211, as pynetdicom answers it."""
    calls = []

    def on_store(event):
        calls.append(1)
        if len(calls) == 1:
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = "does not match"
            return status
        raise RuntimeError("handler failed")

    responses, by_send_msg, direct = _serve_with(tmp_path, monkeypatch, on_store, lean=True)
    assert [r.Status for r in responses] == [0xA900, 0xC211]
    assert responses[0].ErrorComment == "does not match"
    assert len(by_send_msg) == 1 and direct == [1]   # the 0xC211 is status-only


def test_the_lean_store_service_leaves_sending_to_pynetdicom_when_a_handler_wants_it(
        tmp_path, monkeypatch):
    """With a handler bound to an event of sending (here EVT_DIMSE_SENT) the response goes
    through pynetdicom, so that the handler sees it."""
    dimse_sent = []
    responses, by_send_msg, direct = _serve_with(
        tmp_path, monkeypatch, lambda event: 0x0000, lean=True,
        extra_handlers=[(evt.EVT_DIMSE_SENT, lambda event: dimse_sent.append(event.message))])
    assert [r.Status for r in responses] == [0x0000, 0x0000]
    assert not direct and len(by_send_msg) == 2 and len(dimse_sent) == 2
