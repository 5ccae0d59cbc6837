"""DICOM Part 10 framing of a received data set, without decoding it (issue 8, ingest speed).

A C-STORE request carries the data set alone, encoded in the presentation context's transfer
syntax. To store it as a DICOM file (PS3.10 section 7.1) the SCP puts the 128-byte preamble,
the ``DICM`` prefix and the File Meta Information group (0002) in front, and to index it the
SCP reads a handful of header attributes. pynetdicom's ``Event.encoded_dataset()`` builds the
group with pydicom's writer each time and copies the data set twice; on the receive path (each
instance's Success waits for it) that cost as much as the index commit. Here:

- :func:`file_prefix` encodes the group directly: the same elements, in the same order and
  padding, as pynetdicom 3.0's ``Event.file_meta`` written by pydicom (Explicit VR Little
  Endian, PS3.10 table 7.1-1), byte for byte (tests/dicom_node/test_part10.py compares them).
- :func:`read_header` parses the data set's leading elements with pydicom up to the last tag
  asked for, so pixel data and everything after it are never read.
- The data set itself is never copied: the SCP writes the prefix, then a view of the
  received bytes.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 section 7.1.2)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    """A UI value: ASCII, padded with one NUL to an even length (PS3.5 section 9.1)."""
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _sh(text: str) -> bytes:
    """An SH value: padded with one space to an even length."""
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_VERSION = _element(0x0002, 0x0001, b"OB", b"\x00\x01")
_IMPLEMENTATION = (_element(0x0002, 0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID))
                   + _element(0x0002, 0x0013, b"SH", _sh(PYNETDICOM_IMPLEMENTATION_VERSION)))


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The File Meta Information group (0002,xxxx) of a received instance, group length
    first (PS3.10 table 7.1-1)."""
    body = b"".join((
        _VERSION,
        _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
        _IMPLEMENTATION,
    ))
    return _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def file_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information: what precedes the data set."""
    return PREAMBLE + file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid)


#: How much of a fragmented data set the header is first looked for in (joined once).
HEADER_PREFIX = 64 * 1024


def read_header(dataset: bytes | memoryview | Sequence[bytes | memoryview],
                transfer_syntax_uid: str, tags: list[int]) -> Dataset:
    """The elements ``tags`` of an encoded data set (no File Meta), reading no further than
    the largest of them. ``dataset`` may be the fragments it was received in (PS3.8 annex E):
    the elements are looked for in the first ``HEADER_PREFIX`` bytes, and in the whole data
    set only if the parse reached the end of that prefix without passing the last tag. A
    deflated data set (PS3.5 A.5) is inflated first.

    Raises whatever pydicom raises for a data set it cannot parse.
    """
    buffers = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    ts = UID(transfer_syntax_uid)
    if ts.is_deflated:
        raw = zlib.decompress(b"".join(buffers), -zlib.MAX_WBITS)
        return _parse(raw, ts, tags)[0]
    total = sum(len(b) for b in buffers)
    if not buffers or len(buffers[0]) >= min(total, HEADER_PREFIX):
        prefix = memoryview(buffers[0] if buffers else b"")[:HEADER_PREFIX]
    else:
        taken = count = 0
        while taken < HEADER_PREFIX and count < len(buffers):
            taken += len(buffers[count])
            count += 1
        prefix = memoryview(b"".join(buffers[:count]))[:HEADER_PREFIX]
    if len(prefix) < total:
        try:
            header, passed = _parse(prefix, ts, tags)
            if passed:
                return header
        except Exception:  # noqa: BLE001 - an element cut by the prefix's end: read it all
            pass
        prefix = b"".join(buffers)
    return _parse(prefix, ts, tags)[0]


def _parse(raw: bytes | memoryview, ts: UID, tags: list[int]) -> tuple[Dataset, bool]:
    """The elements ``tags`` of ``raw``, and whether the parse passed the last of them (so
    that none of them can lie further on)."""
    last = max(tags)
    passed = False

    def stop(tag, _vr, _length) -> bool:  # noqa: ANN001
        nonlocal passed
        if tag > last:
            passed = True
        return passed

    header = read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian,
                          stop_when=stop, specific_tags=tags)
    return header, passed
