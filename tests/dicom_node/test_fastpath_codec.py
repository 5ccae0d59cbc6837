"""dicom_node.fastpath.codec: each encoder and decoder gives what pynetdicom gives.

The C-STORE response is compared byte for byte with pynetdicom's encoding (command set and the
P-DATA-TF PDU), the C-STORE-RQ primitive parsed directly with the one pynetdicom decodes, the
P-DATA-TF parser and the fragmented data set with what they stand in for.
"""
from __future__ import annotations

import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node import part10
from dicom_node.fastpath import codec
from dicom_node.fastpath.codec import FragmentedDataSet, c_store_rsp_command, fragments_of, parse_p_data_tf

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
    assert codec.p_data_tf_command(context_id, command) == P_DATA_TF(primitive).encode()


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
    for decode in (lambda m, p: m.decode_msg(p, None), codec.decode_msg):
        msg = DIMSEMessage()
        msg.data_set = BytesIO()
        done = [decode(msg, p) for p in pdatas]
        assert done[-1] and not any(done[:-1])
        primitive = msg.message_to_primitive()
        results.append((msg, {k: getattr(primitive, k) for k in _PRIMITIVE_FIELDS},
                        primitive.DataSet.getvalue()))
    (plain, plain_fields, plain_data), (fast, fast_fields, fast_data) = results
    assert type(fast) is codec.ParsedCStoreRQ and type(plain).__name__ == "C_STORE_RQ"
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
    assert codec.parse_c_store_rq(_command())[0x1000] == "1.2.3"
    for unusual in (_command(e0100=struct.pack("<H", 0x0030)),      # C-ECHO-RQ
                    _command(e0100=struct.pack("<H", 0x8001)),      # C-STORE-RSP
                    _command(e0900=struct.pack("<H", 0)),           # an element not in it
                    _command(e0110=struct.pack("<HH", 7, 8)),       # US with two values
                    _command(e1000=b"1.2.3\\1.2.4"),                # UI with two values
                    _command(e1000=b""),                            # empty UID
                    _command(e0700=None),                           # Priority missing
                    _command()[:-3],                                # truncated
                    _command() + _element(0x0110, struct.pack("<H", 9))):  # twice
        assert codec.parse_c_store_rq(unusual) is None
    from pynetdicom.dimse_messages import C_ECHO_RQ, DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA
    echo = _command(e0100=struct.pack("<H", 0x0030), e0800=struct.pack("<H", 0x0101),
                    e1000=None)
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x03" + echo]]
    msg = DIMSEMessage()
    msg.data_set = BytesIO()
    assert codec.decode_msg(msg, primitive)
    assert type(msg) is C_ECHO_RQ and msg.command_set.MessageID == 7
