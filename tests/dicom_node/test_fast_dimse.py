"""dicom_node.fast_dimse: the C-STORE data path without copies gives what pynetdicom's gives.

The response is compared byte for byte with pynetdicom's encoding; the P-DATA-TF parser and the
fragmented data set are checked against what they stand in for; and real transfers by dcmtk
``storescu`` with small PDUs (a data set in ~50 fragments, a header beyond the first 64 KiB)
reach a plain pynetdicom handler and the node's store byte for byte.
"""
from __future__ import annotations

import struct
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from dicom_node import fast_dimse, part10
from dicom_node.fast_dimse import (FragmentedDataSet, c_store_rsp_command, fragments_of,
                                   parse_p_data_tf)
from tests.conftest import DCMTK_ENV, dcmtk, storescu

TAGS = [0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00200013, 0x00280008]


@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", "2.25.1234567890123456789012345678901234567"])
@pytest.mark.parametrize("message_id,status", [(1, 0x0000), (65535, 0xA700), (42, 0xB000)])
def test_c_store_response_is_byte_identical_to_pynetdicoms(sop, message_id, status):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    [pdata] = list(msg.encode_msg(3, 16384))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert context_id == 3
    assert pdv == b"\x03" + c_store_rsp_command(CTImageStorage, message_id, status, sop)


@pytest.mark.parametrize("context_id", [1, 3, 255])
def test_the_response_pdu_is_byte_identical_to_pynetdicoms(context_id):
    """What the lean C-STORE service writes to the socket is the P-DATA-TF PDU that
    pynetdicom's DT-1 would encode for the same response."""
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA
    command = c_store_rsp_command(CTImageStorage, 7, 0xA700, "1.2.3.4")
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, b"\x03" + command]]
    assert fast_dimse.p_data_tf_command(context_id, command) == P_DATA_TF(primitive).encode()


def _item(context_id: int, pdv: bytes) -> bytes:
    return struct.pack(">IB", len(pdv) + 1, context_id) + pdv


def test_p_data_tf_items_are_views_of_the_pdu_and_bad_items_raise():
    body = bytearray(_item(1, b"\x03command") + _item(3, b"\x00" + b"x" * 1000))
    pdu = parse_p_data_tf(body)
    pdvs = pdu.to_primitive().presentation_data_value_list
    assert [(c, bytes(v)) for c, v in pdvs] == [(1, b"\x03command"), (3, b"\x00" + b"x" * 1000)]
    assert all(isinstance(v, memoryview) and v.obj is body for _, v in pdvs)  # not copied
    for bad in (b"", _item(1, b"\x03")[:-1] + b"", struct.pack(">IB", 1, 1),
                struct.pack(">IB", 50, 1) + b"\x03short", _item(1, b"\x03ok") + b"\x00\x00"):
        with pytest.raises(ValueError):
            parse_p_data_tf(bytearray(bad))


def test_fragmented_data_set_reads_like_a_bytesio():
    parts = [b"abc", memoryview(b"0123456789")[2:6], bytearray(b"xyz")]
    frag, plain = FragmentedDataSet(), BytesIO()
    for p in parts:
        assert frag.write(p) == plain.write(p)
    assert sum(len(f) for f in frag.fragments) == 10
    assert [bytes(f) for f in fragments_of(frag)] == [b"abc", b"2345", b"xyz"]
    parts[2][0:1] = b"!"           # a writer's buffer changing later changes nothing
    assert frag.tell() == plain.tell() == 10   # joined now: a BytesIO at its end, as after writes
    assert frag.getvalue() == plain.getvalue() == b"abc2345xyz"
    frag.seek(3)
    assert frag.read(4) == b"2345"
    frag.seek(0, 2)
    frag.write(b"++")
    assert frag.getvalue() == b"abc2345xyz++" and bytes(frag.getbuffer()) == b"abc2345xyz++"
    assert fragments_of(frag)[0].tobytes() == b"abc2345xyz++"
    assert fragments_of(None) == []


def test_header_found_in_fragments_and_beyond_the_first_64_kib():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, "1.2.3.4", "CT"
    ds.add_new(0x00190010, "LO", "PRIVATE")
    ds.add_new(0x00191010, "OB", b"\x01" * 100_000)    # before the study UID: > 64 KiB in
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = "1.2.3", "1.2.3.9", 5
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 50_000
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = buf.getvalue()
    for size in (4087, 65536, len(raw)):
        chunks = [memoryview(raw)[i:i + size] for i in range(0, len(raw), size)]
        header = part10.read_header(chunks, ExplicitVRLittleEndian, TAGS)
        assert (header["StudyInstanceUID"], header["SeriesInstanceUID"],
                header["InstanceNumber"]) == ("1.2.3", "1.2.3.9", "5"), size


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
    """A plain pynetdicom SCP in a process where fast_dimse is installed: ``event.dataset``
    and ``event.encoded_dataset()`` see what storescu sent, in 4 KiB PDUs, through the fast
    path (counted); a pynetdicom SCU reads the directly encoded responses."""
    assert fast_dimse.install()
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node sets it
    calls = {"pdus": 0, "responses": 0}

    def counted(name, fn):  # noqa: ANN001
        def wrapper(*args):  # noqa: ANN002
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(fast_dimse, "parse_p_data_tf", counted("pdus", parse_p_data_tf))
    monkeypatch.setattr(fast_dimse, "c_store_rsp_command",
                        counted("responses", c_store_rsp_command))
    files = _files(tmp_path / "series", 3, private_bytes=70_000)
    got: dict[str, tuple[bytes, Dataset]] = {}

    def on_store(event):  # noqa: ANN001
        ds = event.dataset
        got[ds.SOPInstanceUID] = (event.encoded_dataset(), ds)
        return 0x0000

    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        import subprocess
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
def test_node_stores_what_storescu_sent_byte_for_byte(node_factory, tmp_path, pdu):
    """The node writes the fragments as they came (writev): each stored file is the Part 10
    prefix plus exactly the data set bytes of the sent file; a header beyond the first 64 KiB
    (a large private element) is found too."""
    node = node_factory().start()
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
    ("item-overflow", struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IB", 50, 1) + b"\x03x"),
    ("item-short", struct.pack(">BBI", 0x04, 0, 4) + struct.pack(">I", 1)),
    ("announces-2GiB", struct.pack(">BBI", 0x04, 0, 2**31) + b"\x00" * 64),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_p_data_aborts_that_association_only(node_factory, tmp_path, kind, pdu):
    """A broken P-DATA-TF PDU on an established association: the node aborts it (or, for a
    header that announces 2 GiB and sends 64 bytes, waits for the rest without reserving it:
    the old read took ~2 GB of RSS here), and goes on storing for everyone else."""
    node = node_factory().start()
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


# -- C-STORE-RQ command sets parsed directly -------------------------------------------------
def _c_store_rq_pdatas(sop: str, *, priority: int = 0, mover: str | None = None,
                       max_pdu: int = 16384) -> list:
    from pynetdicom.dimse_messages import C_STORE_RQ
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop
    req.Priority = priority
    if mover is not None:
        req.MoveOriginatorApplicationEntityTitle = mover
        req.MoveOriginatorMessageID = 65535
    req.DataSet = BytesIO(b"\x08\x00\x18\x00" + b"\x00" * 96)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return list(msg.encode_msg(5, max_pdu))


_PRIMITIVE_FIELDS = ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                     "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                     "_context_id")


@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", "2.25.1234567890123456789012345678901234567"])
@pytest.mark.parametrize("priority,mover,max_pdu", [(0, None, 16384), (2, "MOVER", 16384),
                                                     (1, "A", 40)])
def test_c_store_rq_parsed_directly_gives_pynetdicoms_primitive(sop, priority, mover, max_pdu):
    """Odd and even UID lengths (null padding), the optional move originator, a command set in
    fragments (40-byte PDUs): the directly parsed primitive equals pynetdicom's, and so does the
    command set decoded on demand."""
    from pynetdicom.dimse_messages import DIMSEMessage
    pdatas = _c_store_rq_pdatas(sop, priority=priority, mover=mover, max_pdu=max_pdu)
    if max_pdu == 40:
        assert sum(1 for p in pdatas for _, v in p.presentation_data_value_list
                   if v[0] & 1) > 3
    results = []
    for decode in (lambda m, p: m.decode_msg(p, None), fast_dimse.decode_msg):
        msg = DIMSEMessage()
        msg.data_set = BytesIO()
        done = [decode(msg, p) for p in pdatas]
        assert done[-1] and not any(done[:-1])
        primitive = msg.message_to_primitive()
        results.append((msg, {k: getattr(primitive, k) for k in _PRIMITIVE_FIELDS},
                        primitive.DataSet.getvalue()))
    (plain, plain_fields, plain_data), (fast, fast_fields, fast_data) = results
    assert type(fast) is fast_dimse.ParsedCStoreRQ and type(plain).__name__ == "C_STORE_RQ"
    assert fast_fields == plain_fields and fast_data == plain_data
    assert list(fast.command_set) == list(plain.command_set)


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


_GOOD = {0x0002: CTImageStorage.encode() + b"\0", 0x0100: struct.pack("<H", 1),
         0x0110: struct.pack("<H", 7), 0x0700: struct.pack("<H", 0),
         0x0800: struct.pack("<H", 0), 0x1000: b"1.2.3\0"}


def _command(**changes: bytes | None) -> bytes:
    elements = dict(_GOOD)
    for key, value in changes.items():
        elem = int(key[1:], 16)
        if value is None:
            elements.pop(elem)
        else:
            elements[elem] = value
    return b"".join(_element(e, v) for e, v in sorted(elements.items()))


def test_unusual_command_sets_are_left_to_pydicom():
    """Anything but a plain C-STORE-RQ command set: ``parse_c_store_rq`` declines, and
    ``decode_msg`` decodes it with pydicom, as pynetdicom does."""
    assert fast_dimse.parse_c_store_rq(_command())[0x1000] == "1.2.3"
    for unusual in (_command(e0100=struct.pack("<H", 0x0030)),      # C-ECHO-RQ
                    _command(e0100=struct.pack("<H", 0x8001)),      # C-STORE-RSP
                    _command(e0900=struct.pack("<H", 0)),           # an element not in it
                    _command(e0110=struct.pack("<HH", 7, 8)),       # US with two values
                    _command(e1000=b"1.2.3\\1.2.4"),                # UI with two values
                    _command(e1000=b""),                            # empty UID
                    _command(e0700=None),                           # Priority missing
                    _command()[:-3],                                # truncated
                    _command() + _element(0x0110, struct.pack("<H", 9))):  # twice
        assert fast_dimse.parse_c_store_rq(unusual) is None
    from pynetdicom.dimse_messages import C_ECHO_RQ, DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA
    echo = _command(e0100=struct.pack("<H", 0x0030), e0800=struct.pack("<H", 0x0101),
                    e1000=None)
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x03" + echo]]
    msg = DIMSEMessage()
    msg.data_set = BytesIO()
    assert fast_dimse.decode_msg(msg, primitive)
    assert type(msg) is C_ECHO_RQ and msg.command_set.MessageID == 7


# -- C-STORE served in the DUL thread --------------------------------------------------------
class _FakeAssoc:
    """What ``_serve_inline`` looks at on an association."""

    def __init__(self, fail: bool = False):
        import queue
        from types import SimpleNamespace
        self.is_acceptor = True
        self._spn_reactor = True
        self._spn_serving = False
        self._sent_release = False
        self._accepted_cx = {5: object()}
        self.dimse = SimpleNamespace(msg_queue=queue.Queue())
        self.dul = SimpleNamespace(_idle_timer=SimpleNamespace(restart=lambda: None))
        self.served: list[tuple[object, int, bool]] = []
        self.aborted: list[bool] = []
        self.fail = fail

    def _serve_request(self, primitive, context_id):  # noqa: ANN001
        self.served.append((primitive, context_id, self._spn_serving))
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
    monkeypatch.setattr(fast_dimse, "_inline_store", True)
    monkeypatch.setattr(fast_dimse, "_lean_store", False)   # the fake serves it itself
    req = _store_request()
    assoc = _FakeAssoc()
    assert fast_dimse._serve_inline(assoc, req, 5)
    assert assoc.served == [(req, 5, True)] and assoc._spn_serving is False

    declined = []
    queued = _FakeAssoc()
    queued.dimse.msg_queue.put((5, "an earlier request"))   # not yet taken
    declined.append(queued)
    serving = _FakeAssoc()
    serving._spn_serving = True                             # the association thread serves one
    declined.append(serving)
    requestor = _FakeAssoc()
    requestor.is_acceptor = False                           # an SCU's association
    declined.append(requestor)
    plain_reactor = _FakeAssoc()
    plain_reactor._spn_reactor = False                      # pynetdicom's own reactor
    declined.append(plain_reactor)
    releasing = _FakeAssoc()
    releasing._sent_release = True
    declined.append(releasing)
    for other in declined:
        assert not fast_dimse._serve_inline(other, req, 5) and not other.served
    assert not fast_dimse._serve_inline(_FakeAssoc(), req, 3)           # unknown context
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert not fast_dimse._serve_inline(_FakeAssoc(), echo, 5)          # not a C-STORE
    rsp = _store_request()
    rsp.MessageIDBeingRespondedTo = 1
    assert not fast_dimse._serve_inline(_FakeAssoc(), rsp, 5)           # a response
    monkeypatch.setattr(fast_dimse, "_inline_store", False)
    assert not fast_dimse._serve_inline(_FakeAssoc(), req, 5)           # not asked for


def test_a_failure_while_serving_in_the_dul_thread_aborts_without_waiting(monkeypatch):
    """What would have ended the association thread: logged, the association aborted
    without blocking (the DUL thread itself must send the A-ABORT), the flag cleared."""
    monkeypatch.setattr(fast_dimse, "_inline_store", True)
    monkeypatch.setattr(fast_dimse, "_lean_store", False)
    assoc = _FakeAssoc(fail=True)
    assert fast_dimse._serve_inline(assoc, _store_request(), 5)
    assert assoc.aborted == [False] and assoc._spn_serving is False


def test_the_storage_scp_serves_c_store_in_the_dul_thread_and_c_echo_in_its_own(tmp_path,
                                                                               monkeypatch):
    """A pynetdicom SCP in a process where the node's patches are installed with
    ``inline_store``: each C-STORE handler runs in the DUL thread of its association, a C-ECHO
    in the association thread; a pynetdicom SCU gets every answer."""
    import threading

    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.sop_class import Verification

    from dicom_node import fast_dul
    assert fast_dul.install() and fast_dimse.install(inline_store=True)
    monkeypatch.setattr(fast_dimse, "_inline_store", True)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    threads: dict[str, list] = {"store": [], "echo": []}

    def on_store(event):  # noqa: ANN001
        threads["store"].append(threading.current_thread())
        return 0x0000

    def on_echo(event):  # noqa: ANN001
        threads["echo"].append(threading.current_thread())
        return 0x0000

    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_C_ECHO, on_echo)])
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
    assert all(isinstance(t, DULServiceProvider) for t in threads["store"])
    assert not any(isinstance(t, DULServiceProvider) for t in threads["echo"])


def _serve_with(tmp_path, monkeypatch, on_store, *, lean: bool, extra_handlers=(),
                count: int = 2):  # noqa: ANN001
    """C-STOREs from a pynetdicom SCU to a pynetdicom SCP in a process where the node's
    patches are installed with ``inline_store``: the response command sets the SCU decoded,
    the responses the DIMSE provider's ``send_msg`` sent, and the context IDs of those the
    lean service wrote to the socket itself."""
    from dicom_node import fast_dul
    assert fast_dul.install() and fast_dimse.install(inline_store=True)
    monkeypatch.setattr(fast_dimse, "_inline_store", True)
    monkeypatch.setattr(fast_dimse, "_lean_store", lean)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    from pynetdicom.dimse import DIMSEServiceProvider
    sent_by_pynetdicom = []   # responses only: the SCU's requests go through it too
    orig = DIMSEServiceProvider.send_msg

    def send_msg(dimse, primitive, cx):  # noqa: ANN001, ANN202
        if primitive.MessageIDBeingRespondedTo is not None:
            sent_by_pynetdicom.append(primitive)
        return orig(dimse, primitive, cx)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send_msg)
    direct = []
    real_pdata = fast_dimse.p_data_tf_command
    monkeypatch.setattr(fast_dimse, "p_data_tf_command",
                        lambda cx, command: (direct.append(cx), real_pdata(cx, command))[1])
    ae = AE(ae_title="PLAINSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), *extra_handlers])
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
    return received, sent_by_pynetdicom, direct


@pytest.mark.parametrize("lean", [True, False])
def test_the_lean_store_service_answers_as_pynetdicom_does(tmp_path, monkeypatch, lean):
    """The status a handler returns reaches the SCU, with the request's UIDs and message ID;
    with the lean service as one PDU written by the DUL thread itself, without it through
    pynetdicom's service class (the same answer)."""
    seen = []

    def on_store(event):  # noqa: ANN001
        seen.append((event.request.AffectedSOPInstanceUID, event.request.MessageID))
        return 0xB000 if len(seen) == 2 else 0x0000

    responses, by_pynetdicom, direct = _serve_with(tmp_path, monkeypatch, on_store, lean=lean)
    assert [r.Status for r in responses] == [0x0000, 0xB000]
    assert [(str(r.AffectedSOPInstanceUID), r.MessageIDBeingRespondedTo)
            for r in responses] == seen
    assert all(r.AffectedSOPClassUID == CTImageStorage for r in responses)
    assert all(r.CommandField == 0x8001 and r.CommandDataSetType == 0x0101
               for r in responses)
    if lean:
        assert len(direct) == 2 and not by_pynetdicom
    else:
        assert not direct and len(by_pynetdicom) == 2


def test_the_lean_store_service_keeps_pynetdicoms_answers_to_unusual_handlers(tmp_path,
                                                                             monkeypatch):
    """A status Dataset (with an Error Comment) goes through pynetdicom's validation and
    encoding; a handler that raises is answered 0xC211, as pynetdicom answers it."""
    calls = []

    def on_store(event):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 1:
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = "does not match"
            return status
        raise RuntimeError("handler failed")

    responses, by_pynetdicom, direct = _serve_with(tmp_path, monkeypatch, on_store, lean=True)
    assert [r.Status for r in responses] == [0xA900, 0xC211]
    assert responses[0].ErrorComment == "does not match"
    assert len(by_pynetdicom) == 1 and direct == [1]   # the 0xC211 is status-only


def test_the_lean_store_service_leaves_sending_to_pynetdicom_when_a_handler_wants_it(
        tmp_path, monkeypatch):
    """With a handler bound to an event of sending (here EVT_DIMSE_SENT) the response goes
    through pynetdicom, so that the handler sees it."""
    dimse_sent = []
    responses, by_pynetdicom, direct = _serve_with(
        tmp_path, monkeypatch, lambda event: 0x0000, lean=True,
        extra_handlers=[(evt.EVT_DIMSE_SENT, lambda event: dimse_sent.append(event.message))])
    assert [r.Status for r in responses] == [0x0000, 0x0000]
    assert not direct and len(by_pynetdicom) == 2 and len(dimse_sent) == 2
