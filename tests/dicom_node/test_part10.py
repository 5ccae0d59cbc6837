"""The SCP's Part 10 framing (dicom_node/part10.py) against pynetdicom's and pydicom's own."""
from __future__ import annotations

import zlib
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.part10 import file_meta, file_prefix, read_header

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", "2.25.1234567890123456789012345678901234567"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                                DeflatedExplicitVRLittleEndian])
def test_file_meta_is_byte_identical_to_pynetdicoms(sop, ts):
    expected = encode_file_meta(create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(sop),
                                                 transfer_syntax=UID(ts)))
    assert file_meta(CT, sop, ts) == expected


def _encoded(ts: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.InstanceNumber = 7
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 8
    uid = UID(ts)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = uid.is_implicit_VR, uid.is_little_endian
    write_dataset(buf, ds)
    raw = buf.getvalue()
    if uid.is_deflated:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw


TAGS = [0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00200013, 0x00280008]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_read_header_in_every_syntax_and_the_file_reads_back(ts):
    raw = _encoded(ts)
    header = read_header(memoryview(raw), ts, TAGS)
    assert header == {"SOPClassUID": CT, "SOPInstanceUID": "1.2.3.4.5", "Modality": "CT",
                      "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4",
                      "InstanceNumber": "7"}   # stopped after the last tag asked for
    # prefix + data set as received is a Part 10 file pydicom reads
    ds = dcmread(BytesIO(file_prefix(CT, "1.2.3.4.5", ts) + raw))
    assert ds.file_meta.TransferSyntaxUID == ts and ds.SOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"


def _variant(ts: str, kind: str) -> bytes:
    """Data sets the header walk must read as pydicom does, or hand to pydicom."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    if kind == "sequence":        # pydicom writes it with undefined length: left to pydicom
        item = Dataset()
        item.CodeValue = "X"
        ds.add_new(0x00081032, "SQ", [item])
    if kind == "private":
        ds.add_new(0x00190010, "LO", "ACME")
        ds.add_new(0x00191001, "OB", b"\x01" * 301)
    ds.Modality = "CT " if kind == "padding" else "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    if kind != "missing":
        ds.InstanceNumber = " 12 " if kind == "padding" else 12
    if kind == "frames":
        ds.NumberOfFrames = 3
    ds.Rows = 2
    if kind == "ends-early":
        del ds.Rows
    uid = UID(ts)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = uid.is_implicit_VR, uid.is_little_endian
    write_dataset(buf, ds)
    raw = buf.getvalue()
    if kind == "truncated":
        raw = raw[:-3]
    return raw


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("kind", ["plain", "sequence", "private", "padding", "missing", "frames",
                                  "ends-early", "truncated"])
def test_header_walk_agrees_with_pydicom(ts, kind, monkeypatch):
    from dicom_node import part10
    from dicom_node.part10 import _pydicom_header
    raw = _variant(ts, kind)
    try:
        expected = _pydicom_header(raw, UID(ts), TAGS)
    except Exception as exc:  # noqa: BLE001 - then the walk must raise too (via pydicom)
        with pytest.raises(type(exc)):
            read_header(raw, ts, TAGS)
        return
    expected = {k: v.strip() for k, v in expected.items()}   # IS " 12 " -> "12" for both
    if kind not in ("sequence", "truncated"):   # read by the walk alone
        monkeypatch.setattr(part10, "_pydicom_header", None)
    got = read_header(raw, ts, TAGS)
    assert got == expected
    # fragments of any size give the same
    for size in (1, 7, 64, len(raw)):
        chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
        assert read_header(chunks, ts, TAGS) == expected
