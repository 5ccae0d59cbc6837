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
from pynetdicom.dimse_primitives import C_STORE

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
