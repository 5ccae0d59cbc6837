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
- a C-STORE-RQ command set (PS3.7 table 9.3-1) is read by :func:`parse_c_store_rq` with
  ``struct`` instead of being decoded into a pydicom ``Dataset`` and then copied element by
  element into the primitive: 296 us against 59 us per request on this machine (the primitive
  is still built through pynetdicom's validating setters; tests compare it with pynetdicom's).
  Anything else in a command set (another command, another element, several values) is
  decoded by pydicom as before; a handler that reads ``message.command_set`` gets it decoded
  on demand.
- with ``install(inline_store=True)`` (the storage SCP), a complete C-STORE request of an
  acceptor's association is served in the DUL thread that decoded it
  (:func:`_serve_inline`), instead of being queued for the association thread: two thread
  hand-offs less per instance (the request on its way in, the response on its way out), when
  that keeps pynetdicom's order: the association thread holds no request and serves none.
  There it is served by :func:`_serve_store`, which does what pynetdicom's
  ``Association._serve_request`` and ``StorageServiceClass.SCP`` do (the handler bound to
  ``EVT_C_STORE`` called through ``evt.trigger``, an exception answered 0xC211, a status
  ``Dataset`` validated and sent by pynetdicom) without building their objects, and writes a
  status-only response to the socket at once as one P-DATA-TF PDU (:func:`p_data_tf_command`)
  when nothing is queued before it and no handler is bound to an event of sending. Four
  senders, 300 slices, against pynetdicom's service path in the same runs: 1.11 s against
  1.26 s, faster in 8 rounds of 9, 1.03 s of CPU against 1.14; one sender 1.45 s against
  1.62 s, faster in 7 of 9 (docs/archive/bench-history.md, seventh round). ``SPINE_LEAN_STORE=0`` leaves
  it to pynetdicom.
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

import functools
import os
import socket
import struct
import threading
from io import BytesIO
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import service_class as _service_class_mod
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

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

    _spn_raw: bytes
    _spn_values: dict[int, int | str]

    @property
    def command_set(self) -> Dataset:  # type: ignore[override]
        dataset = self.__dict__.get("_spn_command_set")
        if dataset is None:
            dataset = _dimse_messages.decode(BytesIO(self._spn_raw), True, True)
            self.__dict__["_spn_command_set"] = dataset
        return dataset

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self.__dict__["_spn_command_set"] = value

    def message_to_primitive(self) -> C_STORE:
        """The C-STORE primitive, as pynetdicom's ``message_to_primitive`` makes it: every
        command element the primitive has a parameter for, set through its (validating)
        setter, then the data set and the context."""
        values = self._spn_values
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
                    message._spn_raw = raw
                    message._spn_values = values
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


_inline_store = False   # set by install(inline_store=True): the storage SCP's choice


def _serve_inline(assoc: Any, primitive: Any, context_id: int) -> bool:  # noqa: ANN401
    """Serve a C-STORE request in the DUL thread that decoded it, if that keeps pynetdicom's
    order: an acceptor's association, whose reactor is :mod:`dicom_node.fast_dul`'s (it marks
    itself busy while it serves a request), holds no request and serves none, on an accepted
    context. Returns False where the request must go to the association's queue."""
    if not (_inline_store and type(primitive) is C_STORE and assoc.is_acceptor
            and primitive.MessageIDBeingRespondedTo is None
            and getattr(assoc, "_spn_reactor", False)
            and context_id in assoc._accepted_cx and not assoc._sent_release):
        return False
    msg_queue = assoc.dimse.msg_queue
    with msg_queue.mutex:
        if msg_queue._qsize() or assoc._spn_serving:
            return False
        assoc._spn_serving = True
    try:
        if not _serve_store(assoc, primitive, context_id):
            assoc._serve_request(primitive, context_id)
    except Exception as exc:  # noqa: BLE001 - the association thread would have died of it
        log.error("C-STORE service failed in the DUL thread; aborting the association",
                  extra={"error": f"{type(exc).__name__}: {exc}"})
        assoc.abort(block=False)
    finally:
        assoc.dul._idle_timer.restart()  # as if the request had been served just now
        with msg_queue.mutex:
            assoc._spn_serving = False
    return True


#: Serve inline C-STORE requests with :func:`_serve_store` (``SPINE_LEAN_STORE=0``: through
#: pynetdicom's ``_serve_request`` and service class, for diagnosis and benchmarks).
_lean_store = os.environ.get("SPINE_LEAN_STORE", "1") != "0"


def _serve_store(assoc: Any, req: C_STORE, context_id: int) -> bool:  # noqa: ANN401
    """pynetdicom 3.0.4's ``Association._serve_request`` and ``StorageServiceClass.SCP`` for
    a C-STORE request served in the DUL thread (PS3.4 annex B), without the service class
    objects: the handler bound to ``EVT_C_STORE`` is called as pynetdicom calls it
    (``evt.trigger``, with ``abort`` non-blocking meanwhile, an exception answered 0xC211), and
    a status it returns as an ``int`` is answered with a directly encoded response
    (:func:`_send_store_rsp`); a status ``Dataset`` goes through pynetdicom's
    ``validate_status`` and ``send_msg``. False where pynetdicom's own path must serve it:
    a request that is not valid, SOP Class Common Extended Negotiation, pynetdicom's
    unrestricted storage service, a SOP class whose service is not Storage, a data set
    written to a file (``STORE_RECV_CHUNKED_DATASET``)."""
    if (not _lean_store or _config.UNRESTRICTED_STORAGE_SERVICE
            or _config.STORE_RECV_CHUNKED_DATASET):
        return False
    class_uid = req.AffectedSOPClassUID
    if (class_uid is None or class_uid in assoc.acceptor.accepted_common_extended
            or _service_class(class_uid) is not StorageServiceClass
            or not req.is_valid_request):
        return False
    context = assoc._accepted_cx[context_id]
    dimse = assoc.dimse
    dimse.cancel_req = {}
    assoc._is_paused = True
    assoc.abort = assoc._abort_nonblocking
    try:
        try:
            status = evt.trigger(assoc, evt.EVT_C_STORE,
                                 {"request": req, "context": context.as_tuple})
        except Exception as exc:  # noqa: BLE001 - as pynetdicom's ``attempt``: answered
            _service_class_mod.LOGGER.error("Exception in handler bound to 'evt.EVT_C_STORE'")
            _service_class_mod.LOGGER.exception(exc)
            _send_store_rsp(dimse, context_id, req, 0xC211)
            return True
    finally:
        assoc.abort = assoc._abort_blocking
        assoc._is_paused = False
        dimse.cancel_req = {}
    if not assoc.is_established:   # the handler aborted (or released) the association
        return True
    if type(status) is int:
        if status not in STORAGE_SERVICE_CLASS_STATUS:
            _service_class_mod.LOGGER.warning(
                f"Unknown status value returned by callback - 0x{status:04X}")
        _send_store_rsp(dimse, context_id, req, status)
        return True
    rsp = StorageServiceClass(assoc).validate_status(status, _store_rsp(req))
    dimse.send_msg(rsp, context_id)
    return True


def _store_rsp(req: C_STORE) -> C_STORE:
    """The response primitive pynetdicom's ``StorageServiceClass.SCP`` starts from."""
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    return rsp


@functools.lru_cache(maxsize=64)
def _service_class(class_uid: str) -> type:
    return uid_to_service_class(class_uid)


def p_data_tf_command(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU (PS3.8 section 9.3.5) that carries a whole command set in one PDV:
    PDU type 04, reserved, PDU length; item length, presentation context ID; the message
    control header 03 (a command, its last fragment; PS3.8 annex E.2), the command set."""
    n = len(command)
    return struct.pack(">BBIIBB", _P_DATA_TF, 0, n + 6, n + 2, context_id, 0x03) + command


def _send_store_rsp(dimse: DIMSEServiceProvider, context_id: int, req: C_STORE,
                    status: int) -> None:
    """A status-only C-STORE response (PS3.7 9.3.1.2), as ``_send_msg`` sends it; from the
    DUL thread in Sta6 with nothing queued before it and no handler bound to the events of
    sending, written to the socket at once as one P-DATA-TF PDU (PS3.8 9.3.5: one PDV, the
    last fragment of a command) instead of queued for the DUL's next pass."""
    command = c_store_rsp_command(req.AffectedSOPClassUID, req.MessageID, status,
                                  req.AffectedSOPInstanceUID)
    dul = dimse.dul
    assoc = dimse.assoc
    max_pdu = dimse.maximum_pdu_size
    if (threading.current_thread() is dul and dul.state_machine.current_state == "Sta6"
            and not dul.to_provider_queue.qsize() and not dul.event_queue.qsize()
            and (not max_pdu or len(command) + 7 <= max_pdu)
            and not assoc.get_handlers(evt.EVT_PDU_SENT)
            and not assoc.get_handlers(evt.EVT_DATA_SENT)
            and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
            and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)):
        dul.socket.send(p_data_tf_command(context_id, command))
        return
    rsp = _store_rsp(req)
    rsp.Status = status
    dimse.send_msg(rsp, context_id)


def _receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    """pynetdicom 3.0.4's ``DIMSEServiceProvider.receive_primitive`` with a
    :class:`FragmentedDataSet` as a new message's data set, and a complete C-STORE request
    served at once in this (the DUL) thread when :func:`_serve_inline` allows, instead of
    being queued for the association thread: no thread hand-off on the way in, and the
    response is written by this thread (:func:`_send_store_rsp`), none on the way out
    either."""
    if self.message is None:
        self.message = DIMSEMessage()
        self.message.data_set = FragmentedDataSet()

    if _config.STORE_RECV_CHUNKED_DATASET:
        complete = self.message.decode_msg(primitive, self.assoc)
    else:
        complete = decode_msg(self.message, primitive)
    if complete:
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})

        context_id = self.message.context_id
        try:
            d_primitive = self.message.message_to_primitive()
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: the association ends
            _dimse.LOGGER.error("Received an invalid DIMSE message")
            _dimse.LOGGER.exception(exc)
            self.dul.event_queue.put("Evt19")
            return

        # Reset the DIMSE message, ready for the next one (pynetdicom issue #41)
        self.message.encoded_command_set = BytesIO()
        self.message.data_set = BytesIO()
        self.message._data_set_file = None
        self.message._data_set_path = None
        self.message = None

        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[d_primitive.MessageIDBeingRespondedTo] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            threading.Thread(target=_dimse.make_target(self.assoc._serve_request),
                             args=(d_primitive, context_id)).start()
        elif not _serve_inline(self.assoc, d_primitive, context_id):
            self.msg_queue.put((context_id, d_primitive))


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
def install(*, inline_store: bool = False) -> bool:
    """Patch pynetdicom (once per process); False if its version is not one we checked.

    ``inline_store``: serve C-STORE requests of acceptor associations in the DUL thread
    (:func:`_serve_inline`; the storage SCP, whose handler neither aborts nor sends requests on
    the association; ``SPINE_INLINE_STORE=0`` turns it off)."""
    global _installed, _inline_store
    with _install_lock:
        if inline_store and os.environ.get("SPINE_INLINE_STORE", "1") != "0":
            _inline_store = True
        if _installed:
            return True
        if not may_patch("fast_dimse", "SPINE_FAST_DIMSE", "C-STORE data path kept"):
            return False
        DULServiceProvider._read_pdu_data = _read_pdu_data
        DIMSEServiceProvider.receive_primitive = _receive_primitive
        DIMSEServiceProvider.send_msg = _send_msg
        _installed = True
        return True
