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
- :func:`read_header` reads the data set's leading elements up to the last tag asked for, so
  pixel data and everything after it are never read: by walking the element headers of a
  Little Endian data set (~10 us, pydicom's reader ~100-140 us for the same), by pydicom
  for anything unusual.
- The data set itself is never copied: the SCP writes the prefix, then a view of the
  received bytes.
"""
from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from io import BytesIO

from pydicom.datadict import keyword_for_tag
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

#: Explicit VR Little Endian VRs with a 2-byte reserved field and a 4-byte length (PS3.5
#: table 7.1-1); every other VR the reader knows has a 2-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())


def read_header(dataset: bytes | memoryview | Sequence[bytes | memoryview],
                transfer_syntax_uid: str, tags: list[int]) -> dict[str, str]:
    """The values of the elements ``tags`` of an encoded data set (no File Meta) as text,
    keyed by keyword (absent elements are left out), reading no further than the largest of
    them.

    ``dataset`` may be the fragments it was received in (PS3.8 annex E). The elements are
    looked for in the first ``HEADER_PREFIX`` bytes, and in the whole data set only if that
    prefix ended before the last tag. Little Endian data sets whose leading elements all have
    defined lengths are read by :func:`_scan` (the received instance's Success waits for this
    read); anything else (Big Endian, deflated (inflated first, PS3.5 A.5), an undefined
    length, a VR it does not know) by pydicom, whose errors propagate.
    """
    buffers = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    ts = UID(transfer_syntax_uid)
    if ts.is_deflated:
        return _pydicom_header(zlib.decompress(b"".join(buffers), -zlib.MAX_WBITS), ts, tags)
    total = sum(len(b) for b in buffers)
    if not buffers or len(buffers[0]) >= min(total, HEADER_PREFIX):
        prefix = memoryview(buffers[0] if buffers else b"")[:HEADER_PREFIX]
    else:
        taken = count = 0
        while taken < HEADER_PREFIX and count < len(buffers):
            taken += len(buffers[count])
            count += 1
        prefix = memoryview(b"".join(buffers[:count]))[:HEADER_PREFIX]
    if ts.is_little_endian:
        found = _scan(prefix, not ts.is_implicit_VR, tags, complete=len(prefix) == total)
        if found is None and len(prefix) < total:
            prefix = memoryview(b"".join(buffers))
            found = _scan(prefix, not ts.is_implicit_VR, tags, complete=True)
        if found is not None:
            return found
    elif len(prefix) < total:
        prefix = memoryview(b"".join(buffers))
    return _pydicom_header(prefix, ts, tags)


@functools.lru_cache(maxsize=8)
def _keywords(tags: tuple[int, ...]) -> dict[int, str]:
    return {tag: keyword_for_tag(tag) for tag in tags}


def _text(raw: bytes) -> str:
    """A value as text without the padding of its VR (trailing NULs and spaces, PS3.5 6.2)."""
    return raw.decode("latin-1").rstrip("\x00 ").lstrip(" ")


def _scan(raw: memoryview, explicit: bool, tags: list[int],
          complete: bool) -> dict[str, str] | None:
    """The elements ``tags`` of a Little Endian data set by walking its element headers
    (PS3.5 7.1.2 explicit VR, 7.1.3 implicit VR); ``None`` where pydicom must decide: an
    undefined length or an unknown VR before the last tag, or ``raw`` ending before it
    (unless ``complete``: then the data set simply ends there)."""
    want = _keywords(tuple(tags))
    last = max(tags)
    found: dict[str, str] = {}
    pos, end = 0, len(raw)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", raw, pos)
        tag = group << 16 | elem
        if tag > last:
            return found
        if explicit:
            vr = bytes(raw[pos + 4:pos + 6])
            if vr in _SHORT_VRS:
                (length,), head = struct.unpack_from("<H", raw, pos + 6), 8
            elif vr in _LONG_VRS and pos + 12 <= end:
                (length,), head = struct.unpack_from("<I", raw, pos + 8), 12
            else:
                return None
        else:
            (length,), head = struct.unpack_from("<I", raw, pos + 4), 8
        if length == 0xFFFFFFFF or pos + head + length > end:
            return None
        if tag in want:
            found[want[tag]] = _text(bytes(raw[pos + head:pos + head + length]))
        pos += head + length
    return found if complete and pos == end else None


def _pydicom_header(raw: bytes | memoryview, ts: UID, tags: list[int]) -> dict[str, str]:
    """:func:`read_header`'s result by pydicom's reader (stops after the last tag)."""
    last = max(tags)
    ds = read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian,
                      stop_when=lambda tag, _vr, _length: tag > last, specific_tags=tags)
    found: dict[str, str] = {}
    for tag in tags:
        if tag in ds:
            value = ds[tag].value
            found[keyword_for_tag(tag)] = "" if value is None else str(value)
    return found
