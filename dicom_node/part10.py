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


def read_header(dataset: bytes | memoryview, transfer_syntax_uid: str, tags: list[int]) -> Dataset:
    """The elements ``tags`` of an encoded data set (no File Meta), reading no further than
    the largest of them. A deflated data set (PS3.5 A.5) is inflated first.

    Raises whatever pydicom raises for a data set it cannot parse.
    """
    ts = UID(transfer_syntax_uid)
    raw = dataset
    if ts.is_deflated:
        raw = zlib.decompress(bytes(dataset), -zlib.MAX_WBITS)
    last = max(tags)
    return read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian,
                        stop_when=lambda tag, _vr, _length: tag > last, specific_tags=tags)

