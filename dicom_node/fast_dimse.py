"""The C-STORE data path without copies or pydicom round trips (issue 8, ingest speed).

pynetdicom 3.0.4 moves a received data set through four copies before a handler sees it: the
DUL appends the PDU body to the 6-byte header (``bytestream += recv()``), copies that into
``bytes`` for ``EVT_DATA_RECV``, slices each presentation data value (PDV) out of it
(``P_DATA_TF.decode``) and writes every fragment into a growing ``BytesIO`` (PS3.8 annex E: a
message arrives as fragments in one or more P-DATA-TF PDUs). A 512 x 512 CT slice is 0.5 MB,
so that is ~2 MB of memory traffic, and the page faults of the fresh buffers, per instance.
The C-STORE response is built as a pydicom ``Dataset`` and encoded by pydicom's writer: ~0.5 ms
of CPU per instance on this machine, as much as the receive path's Python work besides.
py-spy of four concurrent senders showed these among the largest costs that hold the GIL.

What :func:`install` changes, in every association of the process:

- a P-DATA-TF PDU (type 0x04) on a plain TCP socket is read into one buffer and its PDVs
  become ``memoryview`` slices of it (:class:`ReceivedPDataTF`), when no handler is bound to
  ``EVT_DATA_RECV`` or ``EVT_PDU_RECV`` (those want the encoded bytes or pynetdicom's PDU
  objects: with a handler bound, or on TLS, or for any other PDU type, pynetdicom's own code
  reads the PDU). The PDU is peeked at (``MSG_PEEK``) to learn its type before anything is
  consumed. Malformed PDV items raise, and the DUL answers as for any undecodable PDU
  (Evt19, A-ABORT), as pynetdicom does.
- a message's data set collects its fragments in a :class:`FragmentedDataSet`, a ``BytesIO``
  that keeps the fragments as they came and joins them only when something reads it the
  ``BytesIO`` way. :mod:`dicom_node.scp` writes the fragments to the file directly (one
  ``writev``), so a received data set is copied once into the kernel's page cache and never in
  Python.
- a C-STORE response that carries only a status (no Offending Element, no Error Comment) is
  encoded directly (PS3.7 section 9.3.1.2 and annex E: the command set, Implicit VR Little
  Endian), byte for byte what pynetdicom encodes (tests/dicom_node/test_fast_dimse.py
  compares them), when no handler is bound to ``EVT_DIMSE_SENT``. Anything else goes through
  pynetdicom.

The state machine, the command set decoding and every event that has a handler are
pynetdicom's own. :func:`install` refuses another pynetdicom version than
``dicom_node.fast_dul.SUPPORTED_VERSIONS``; ``SPINE_FAST_DIMSE=0`` leaves it out (diagnosis).
"""
from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.fast_dul import may_patch
from dicom_node.logging import get_logger

log = get_logger("spine_node.fast_dimse")

_P_DATA_TF = 0x04
_installed = False
_install_lock = threading.Lock()


# -- the data set as fragments -----------------------------------------------------------------
class FragmentedDataSet(BytesIO):
    """A received data set as the fragments it arrived in (``memoryview`` slices of the PDUs).

    ``write`` keeps a reference instead of copying. Everything that reads it as a ``BytesIO``
    (``getvalue``, ``getbuffer``, ``read``, ``seek``, ...) first joins the fragments once, and
    from then on it is a plain ``BytesIO`` positioned at its end, as after ordinary writes.
    Readers that know it use :attr:`fragments` (:func:`fragments_of`) and copy nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fragments: list[memoryview | bytes] | None = []

    def write(self, data: Any) -> int:  # noqa: ANN401 - any bytes-like object
        if self.fragments is None:
            return super().write(data)
        if not isinstance(data, (bytes, memoryview)):
            data = bytes(data)  # a caller's bytearray may change after the call
        self.fragments.append(data)
        return len(data)

    def _join(self) -> None:
        if self.fragments is not None:
            fragments, self.fragments = self.fragments, None
            super().write(b"".join(fragments))

    def getvalue(self) -> bytes:
        self._join()
        return super().getvalue()

    def getbuffer(self) -> memoryview:
        self._join()
        return super().getbuffer()

    def read(self, size: int | None = -1) -> bytes:
        self._join()
        return super().read(size)

    def read1(self, size: int | None = -1) -> bytes:
        self._join()
        return super().read1(size)

    def readinto(self, buffer: Any) -> int:  # noqa: ANN401
        self._join()
        return super().readinto(buffer)

    def readinto1(self, buffer: Any) -> int:  # noqa: ANN401
        self._join()
        return super().readinto1(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._join()
        return super().readline(size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        self._join()
        return super().readlines(hint)

    def __iter__(self):  # noqa: ANN204
        self._join()
        return super().__iter__()

    def __next__(self) -> bytes:
        self._join()
        return super().__next__()

    def seek(self, pos: int, whence: int = 0) -> int:
        self._join()
        return super().seek(pos, whence)

    def tell(self) -> int:
        self._join()
        return super().tell()

    def truncate(self, size: int | None = None) -> int:
        self._join()
        return super().truncate(size)

    def __getstate__(self):  # noqa: ANN204
        self._join()
        return super().__getstate__()


def fragments_of(dataset: BytesIO | None) -> list[memoryview | bytes]:
    """The buffers that make up a received data set, in order, without copying when it is a
    :class:`FragmentedDataSet` that nothing has joined yet (none for no data set)."""
    if dataset is None:
        return []
    if isinstance(dataset, FragmentedDataSet) and dataset.fragments is not None:
        return list(dataset.fragments)
    return [dataset.getbuffer()]


_orig_receive_primitive = DIMSEServiceProvider.receive_primitive


def _receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    """pynetdicom's ``receive_primitive`` with a :class:`FragmentedDataSet` as a new message's
    data set."""
    if self.message is None:
        self.message = DIMSEMessage()
        self.message.data_set = FragmentedDataSet()
    _orig_receive_primitive(self, primitive)


# -- P-DATA-TF PDUs read into one buffer ---------------------------------------------------------
class ReceivedPDataTF(P_DATA_TF):
    """A received P-DATA-TF PDU (PS3.8 section 9.3.5) whose PDVs are views of the one buffer it
    was read into. Only what the state machine uses on a received PDU is provided:
    :meth:`to_primitive`."""

    def __init__(self, pdvs: list[tuple[int, memoryview]]):
        super().__init__()
        self._pdvs = pdvs

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # The setter insists on bytes; the DIMSE decoder only indexes and slices the values.
        primitive._presentation_data_value_list = list(self._pdvs)
        return primitive


def parse_p_data_tf(body: bytearray | bytes) -> ReceivedPDataTF:
    """The PDV items of a P-DATA-TF PDU's variable field (PS3.8 section 9.3.5.1: item length
    (4 bytes, big endian), presentation context ID (1 byte), then the PDV whose first byte is
    the message control header). Raises ``ValueError`` on an item that does not fit."""
    view = memoryview(body)
    pdvs: list[tuple[int, memoryview]] = []
    offset, end = 0, len(view)
    if end == 0:
        raise ValueError("P-DATA-TF PDU without a presentation data value item")
    while offset < end:
        if end - offset < 6:
            raise ValueError("truncated presentation data value item")
        (length,) = struct.unpack_from(">I", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"presentation data value item length {length} does not fit")
        pdvs.append((view[offset + 4], view[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return ReceivedPDataTF(pdvs)


_orig_read_pdu_data = DULServiceProvider._read_pdu_data


def _read_pdu_data(self: DULServiceProvider) -> None:
    """A P-DATA-TF PDU read whole into one buffer, without copies; anything else, and any PDU
    when a handler wants the raw bytes or PDU objects, by pynetdicom's ``_read_pdu_data``."""
    sock = getattr(self.socket, "socket", None)
    assoc = self.assoc
    if (type(sock) is not socket.socket or assoc.get_handlers(evt.EVT_DATA_RECV)
            or assoc.get_handlers(evt.EVT_PDU_RECV)):
        return _orig_read_pdu_data(self)
    try:
        head = sock.recv(6, socket.MSG_PEEK)
    except (OSError, ValueError):
        head = b""
    if len(head) < 6 or head[0] != _P_DATA_TF:
        return _orig_read_pdu_data(self)  # also reports a closed or failed connection
    try:
        self.socket.recv(6)
        (length,) = struct.unpack_from(">I", head, 2)
        body = self.socket.recv(length)
    except (OSError, TimeoutError) as exc:
        pynetdicom.dul.LOGGER.error("Connection closed before the entire PDU was received")
        pynetdicom.dul.LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return None
    if len(body) != length:
        pynetdicom.dul.LOGGER.error(
            f"The received PDU is shorter than expected ({6 + len(body)} of {6 + length} "
            "bytes received)")
        self.event_queue.put("Evt17")
        return None
    try:
        pdu = parse_p_data_tf(body)
    except ValueError as exc:
        pynetdicom.dul.LOGGER.error(f"Unable to decode the received PDU data: {exc}")
        self.event_queue.put("Evt19")
        return None
    self.event_queue.put("Evt10")
    self._recv_pdu.put(pdu)
    return None


# -- C-STORE responses encoded directly --------------------------------------------------------
def _element(elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000 (PS3.5 section 7.1.3)."""
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_rsp_command(sop_class_uid: str, message_id: int, status: int,
                        sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP without Offending Element or Error Comment (PS3.7
    table 9.3-2), group length first, elements in tag order, Implicit VR Little Endian."""
    body = b"".join((
        _element(0x0002, _ui(sop_class_uid)),
        _element(0x0100, struct.pack("<H", 0x8001)),         # Command Field: C-STORE-RSP
        _element(0x0120, struct.pack("<H", message_id)),     # Message ID Being Responded To
        _element(0x0800, struct.pack("<H", 0x0101)),         # Command Data Set Type: none
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _ui(sop_instance_uid)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


_orig_send_msg = DIMSEServiceProvider.send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:  # noqa: ANN401
    """A status-only C-STORE response as one PDV, encoded directly; anything else, or any
    message when ``EVT_DIMSE_SENT`` has a handler, by pynetdicom's ``send_msg``."""
    if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
            and primitive.OffendingElement is None and primitive.ErrorComment is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        command = c_store_rsp_command(primitive.AffectedSOPClassUID,
                                      primitive.MessageIDBeingRespondedTo,
                                      primitive.Status, primitive.AffectedSOPInstanceUID)
        max_pdu = self.maximum_pdu_size
        if not max_pdu or len(command) + 7 <= max_pdu:  # one PDV item: 4 + 1 + 1 + command
            pdata = P_DATA()
            pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
            self.dul.send_pdu(pdata)
            return
    _orig_send_msg(self, primitive, context_id)


# -- install -----------------------------------------------------------------------------------
def install() -> bool:
    """Patch pynetdicom (once per process); False if its version is not one we checked."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        if not may_patch("fast_dimse", "SPINE_FAST_DIMSE", "C-STORE data path kept"):
            return False
        DULServiceProvider._read_pdu_data = _read_pdu_data
        DIMSEServiceProvider.receive_primitive = _receive_primitive
        DIMSEServiceProvider.send_msg = _send_msg
        _installed = True
        return True
