"""The receive path's encoding and decoding, as pure functions of bytes (PS3.7, PS3.8).

Nothing here touches a socket, a thread or a pynetdicom object's state; :mod:`.hooks` calls
these from the storage SCP's associations, and the tests compare each with what pynetdicom
produces for the same input.

- :func:`parse_p_data_tf`: a P-DATA-TF PDU's presentation data value items (PS3.8 9.3.5) as
  ``memoryview`` slices of the one buffer it was read into (:class:`ReceivedPDataTF`), instead
  of pynetdicom's copies.
- :func:`decode_msg`: the fragments of a DIMSE message (PS3.8 annex E) collected as pynetdicom's
  ``DIMSEMessage.decode_msg`` collects them, except that a C-STORE-RQ command set is read by
  :func:`parse_c_store_rq` with ``struct`` (PS3.7 table 9.3-1) instead of by pydicom, and a
  data set keeps its fragments in a :class:`FragmentedDataSet` (:func:`fragments_of`), so the
  SCP writes them to the file without joining them in Python.
- :func:`c_store_rsp_command` and :func:`p_data_tf_command`: a status-only C-STORE-RSP
  (PS3.7 9.3.1.2, Implicit VR Little Endian) in one P-DATA-TF PDU, byte for byte what
  pynetdicom encodes for the same response.
"""
from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

#: PDU type of a P-DATA-TF (PS3.8 table 9-22).
P_DATA_TF_TYPE = 0x04


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

    def write(self, data: Any) -> int:
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

    def readinto(self, buffer: Any) -> int:
        self._join()
        return super().readinto(buffer)

    def readinto1(self, buffer: Any) -> int:
        self._join()
        return super().readinto1(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._join()
        return super().readline(size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        self._join()
        return super().readlines(hint)

    def __iter__(self):
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

    def __getstate__(self):
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


# -- C-STORE-RQ command sets parsed directly -----------------------------------------------------
#: The elements of a C-STORE-RQ command set (PS3.7 table 9.3-1) by element number (group 0000),
#: with their VR: what :func:`parse_c_store_rq` takes; a command set with any other element
#: goes through pydicom.
_C_STORE_RQ_VR = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US",
                  0x0800: "US", 0x1000: "UI", 0x1030: "AE", 0x1031: "US"}
_C_STORE_RQ_REQUIRED = (0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)


def parse_c_store_rq(raw: bytes) -> dict[int, int | str] | None:
    """The values of a C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 section 6.3.1
    and table 9.3-1) by element number, decoded as pydicom decodes them (UI: trailing nulls and
    spaces removed; AE: spaces removed); ``None`` for anything else or anything unusual (another
    command, another element, a value of an unexpected length or with several values): then
    pynetdicom decodes the command set with pydicom, as it always does."""
    values: dict[int, int | str] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            return None
        group, elem, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        vr = _C_STORE_RQ_VR.get(elem) if group == 0 else None
        if vr is None or length > end - offset or elem in values:
            return None
        value = raw[offset:offset + length]
        offset += length
        if vr == "US":
            if length != 2:
                return None
            values[elem] = struct.unpack("<H", value)[0]
        elif vr == "UL":
            if length != 4:
                return None
            values[elem] = struct.unpack("<I", value)[0]
        else:
            text = value.decode("iso8859")
            text = text.rstrip("\0 ") if vr == "UI" else text.strip()
            if not text or "\\" in text:
                return None
            values[elem] = text
    if values.get(0x0100) != 0x0001 or any(e not in values for e in _C_STORE_RQ_REQUIRED):
        return None
    return values


class ParsedCStoreRQ(C_STORE_RQ):
    """A C-STORE-RQ message whose command set :func:`parse_c_store_rq` read; pydicom decodes
    the command set only if something asks for :attr:`command_set` (an ``EVT_DIMSE_RECV``
    handler, pynetdicom's debug logging)."""

    _raw_command: bytes
    _command_values: dict[int, int | str]

    @property
    def command_set(self) -> Dataset:  # type: ignore[override]
        dataset = self.__dict__.get("_decoded_command_set")
        if dataset is None:
            dataset = _dimse_messages.decode(BytesIO(self._raw_command), True, True)
            self.__dict__["_decoded_command_set"] = dataset
        return dataset

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self.__dict__["_decoded_command_set"] = value

    def message_to_primitive(self) -> C_STORE:
        """The C-STORE primitive, as pynetdicom's ``message_to_primitive`` makes it: every
        command element the primitive has a parameter for, set through its (validating)
        setter, then the data set and the context."""
        values = self._command_values
        primitive = C_STORE()
        primitive.AffectedSOPClassUID = values[0x0002]
        primitive.MessageID = values[0x0110]
        primitive.Priority = values[0x0700]
        primitive.AffectedSOPInstanceUID = values[0x1000]
        if 0x1030 in values:
            primitive.MoveOriginatorApplicationEntityTitle = values[0x1030]
        if 0x1031 in values:
            primitive.MoveOriginatorMessageID = values[0x1031]
        primitive.DataSet = self.data_set
        primitive._context_id = self.context_id
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive


def decode_msg(message: DIMSEMessage, primitive: P_DATA) -> bool:
    """pynetdicom 3.0.4's ``DIMSEMessage.decode_msg`` (PS3.8 annex E: the fragments of a
    message's command set and data set), except that a C-STORE-RQ command set is read by
    :func:`parse_c_store_rq` and the message becomes a :class:`ParsedCStoreRQ`; any other
    command set is decoded by pydicom, as there. Not for
    ``_config.STORE_RECV_CHUNKED_DATASET`` (the caller leaves that to pynetdicom)."""
    if primitive.__class__ != P_DATA:
        return False
    for context_id, data in primitive.presentation_data_value_list:
        control = data[0]
        if control & 1:  # a command set fragment
            message.encoded_command_set.write(data[1:])
            if control & 2:  # its last fragment
                message.context_id = context_id
                raw = message.encoded_command_set.getvalue()
                values = parse_c_store_rq(raw)
                if values is not None:
                    message.__class__ = ParsedCStoreRQ
                    message._raw_command = raw
                    message._command_values = values
                    if values[0x0800] == 0x0101:  # no data set
                        return True
                    continue
                message.command_set = _dimse_messages.decode(message.encoded_command_set,
                                                             True, True)
                message.__class__ = _dimse_messages._MESSAGE_TYPES[
                    message.command_set.CommandField][1]
                if message.command_set.CommandDataSetType == 0x0101:
                    return True
        else:  # a data set fragment
            message.data_set.write(data[1:])
            if control & 2:
                return True
    return False


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


def p_data_tf_command(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU (PS3.8 section 9.3.5) that carries a whole command set in one PDV:
    PDU type 04, reserved, PDU length; item length, presentation context ID; the message
    control header 03 (a command, its last fragment; PS3.8 annex E.2), the command set."""
    n = len(command)
    return struct.pack(">BBIIBB", P_DATA_TF_TYPE, 0, n + 6, n + 2, context_id, 0x03) + command
