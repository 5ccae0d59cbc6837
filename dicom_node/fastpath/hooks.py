"""The storage SCP's receive path as subclasses of pynetdicom's classes (``node.fast_path``).

How it is hooked in: by subclassing only; nothing is installed, patched or bound per instance,
and no pynetdicom class, function, module attribute or ``_config`` value is changed. The
storage SCP's server (:class:`dicom_node.acceptors.StorageServer`, started by
``StorageSCP.start``) is given :class:`FastRequestHandler` as its ``request_handler``
(pynetdicom's ``AssociationServer`` parameter for that); for each connection it creates an
:class:`SCPAssociation` whose socket is an :class:`SCPSocket` and whose DUL and DIMSE providers
are an :class:`SCPDUL` and an :class:`SCPDIMSE`. Every other association of the process (the
exporter's, ``spine-node echo`` and ``send``, a peer in a test) is pynetdicom's own
``Association`` with pynetdicom's own providers (tests/dicom_node/test_fastpath_scope.py). With
``node.fast_path = false``, or a pynetdicom version not in :data:`TESTED_PYNETDICOM_VERSIONS`
(then with a warning), the server uses :class:`QuietRequestHandler`: pynetdicom's own
``RequestHandler`` and classes, and nothing else here runs.

What of pynetdicom's private API the subclasses rely on: the methods they override
(``RequestHandler._create_association``, ``Association._run_reactor``,
``DULServiceProvider._read_pdu_data``), and the attributes the copied loops read as
pynetdicom's own loops do (the DUL's queues, timers and ``_kill_thread``, the association's
``_dul_ready``, ``_reactor_checkpoint``, ``_is_paused``, ``_accepted_cx``, ``_serve_request``).

Why (issue 8, ingest speed): pynetdicom 3.0.4 moves every message between threads by polling
(the DUL reactor sleeps 1 ms whenever a pass finds nothing to do; the association reactor
sleeps 1 ms before every look at the DIMSE queue), reads sockets 4 KiB at a time, copies a
received data set four times before a handler sees it, and builds and encodes each C-STORE
response through pydicom. What the subclasses change:

- :class:`SCPDUL`: the reactor waits in ``select()`` on the peer socket and on a wake-up socket
  pair instead of sleeping: data is read the moment it arrives, and ``send_pdu`` (the C-STORE
  response), ``kill_dul`` and ``stop_dul`` end the wait at once. Its timeout (50 ms) only
  bounds how late an expired ARTIM timer is seen, so an idle association no longer takes the
  GIL 1000 times a second. A P-DATA-TF PDU is read whole into one buffer whose PDVs stay
  ``memoryview`` slices of it (:func:`.codec.parse_p_data_tf`), unless a handler is bound to
  ``EVT_DATA_RECV``/``EVT_PDU_RECV`` (those get pynetdicom's own read).
- :class:`SCPAssociation`: the reactor blocks on the DIMSE queue's condition instead of
  sleeping before each look, counted as paused while it waits.
- :class:`SCPDIMSE`: a message's fragments are decoded by :func:`.codec.decode_msg`; a complete
  C-STORE request is served in the DUL thread that decoded it when that keeps pynetdicom's
  order (the association thread holds no request and serves none): two thread hand-offs less
  per instance. There the handler bound to ``EVT_C_STORE`` is called as pynetdicom's
  ``StorageServiceClass.SCP`` calls it, and a status-only response is written at once as one
  PDU (:func:`.codec.c_store_rsp_command`); anything unusual goes through pynetdicom's code.
- :class:`SCPSocket`: ``recv`` reads a whole PDU with ``recv_into`` (plain TCP; TLS sockets
  keep pynetdicom's read), in a buffer that grows with what arrives, never with what a PDU
  header announces.

The state machine, the ACSE, the PDU classes and every event are pynetdicom's. The reactor
loops and ``_serve_store`` are copies of pynetdicom 3.0.4's with the waits (and the service
class objects) replaced, so they hold only for the versions they were compared with:
``pyproject.toml`` pins pynetdicom to those, and tests/dicom_node/test_fastpath_scope.py fails
when another one is installed.
"""
from __future__ import annotations

import functools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from copy import deepcopy
from datetime import datetime
from io import BytesIO
from typing import Any, cast

import pynetdicom
from pynetdicom import _config, _handlers, evt
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom import service_class as _service_class_mod
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.fastpath import codec
from dicom_node.logging import get_logger

log = get_logger("spine_node.fastpath")

#: pynetdicom versions whose code the subclasses below were written against and tested with
#: (their copied loops match these versions' exactly). pyproject.toml pins pynetdicom to them.
TESTED_PYNETDICOM_VERSIONS = ("3.0.4",)

#: Longest the DUL reactor waits before its socket is connected (pynetdicom's own 1 ms sleep).
_DUL_IDLE_WAIT_S = 0.001
#: Longest it waits on the socket and the wake-up: whatever it must act on wakes it at once
#: (data from the peer, ``send_pdu``, ``kill_dul``/``stop_dul``), so the timeout only bounds
#: how late an expired ARTIM timer is noticed. (1 ms here had every idle association's DUL
#: thread take the GIL 1000 times a second, which concurrent senders felt.)
DUL_WAIT_S = 0.05
#: Longest the association reactor waits without a wake-up (idle timer, local abort).
_ASSOC_WAIT_S = 0.02
#: The first buffer of a socket read (larger than any PDU the node negotiates: node.max_pdu).
_RECV_FIRST = 1 << 20


def is_tested_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed pynetdicom) is one the fast path was tested
    with."""
    return (version or pynetdicom.__version__) in TESTED_PYNETDICOM_VERSIONS


def request_handler(fast_path: bool) -> type[RequestHandler]:
    """The request handler class for the storage SCP's server: :class:`FastRequestHandler`
    when ``fast_path`` and the installed pynetdicom is a tested version, else pynetdicom's own
    (with a warning when the version is why)."""
    if not fast_path:
        return QuietRequestHandler
    if not is_tested_version():
        log.warning("node.fast_path: pynetdicom version not tested with the fast receive path; "
                    "stock pynetdicom receives",
                    extra={"version": pynetdicom.__version__,
                           "tested": list(TESTED_PYNETDICOM_VERSIONS)})
        return QuietRequestHandler
    return FastRequestHandler


# -- the socket ---------------------------------------------------------------------------------
def recv_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``sock`` (fewer only if the peer closed), in as few system calls as
    the kernel allows. The length comes from the peer's PDU header (up to 4 GiB, whatever was
    negotiated): the buffer grows with what actually arrives, never ahead of it by more than it
    holds."""
    buf = bytearray(min(nr_bytes, _RECV_FIRST))
    view = memoryview(buf)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            if nr_read == len(buf):
                view.release()
                buf.extend(bytes(min(nr_bytes - nr_read, len(buf))))
                view = memoryview(buf)
            got = sock.recv_into(view[nr_read:], len(buf) - nr_read)
            if not got:
                break
            nr_read += got
    finally:
        view.release()
    if nr_read < len(buf):
        del buf[nr_read:]
    return buf


class SCPSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU in one buffer instead of 4 KiB at a time."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Plain TCP only: a TLS socket (whose ``recv`` may do more, e.g. dicom_node.tls's
        deferred handshake) keeps pynetdicom's read."""
        sock = self.socket
        if type(sock) is not socket.socket:
            return super().recv(nr_bytes)
        return recv_exactly(sock, nr_bytes)


# -- the DUL ------------------------------------------------------------------------------------
class SCPDUL(DULServiceProvider):
    """pynetdicom's DUL provider with event-driven waits and P-DATA-TF PDUs read without
    copies (see the module docstring)."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        #: (read end, write end) of the wake-up socket pair while the reactor runs.
        self._wake_pair: tuple[socket.socket, socket.socket] | None = None

    # wake-up: a primitive to send (the C-STORE response) ends the reactor's wait at once
    def _wake(self) -> None:
        """End the reactor's wait now (a no-op once the reactor has ended)."""
        pair = self._wake_pair
        if pair is not None:
            try:
                pair[1].send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (reactor ended)
                pass

    def send_pdu(self, primitive: Any) -> None:
        """pynetdicom's ``send_pdu`` (queue the primitive), then wake the reactor (not needed
        when the DUL thread queues it itself: its next pass sends it)."""
        super().send_pdu(primitive)
        if threading.current_thread() is not self:
            self._wake()

    def kill_dul(self) -> None:
        """pynetdicom's ``kill_dul`` (flag the reactor to stop), then wake it to see the flag."""
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """pynetdicom 3.0.4's ``stop_dul`` with a wake-up after the flag: stop the reactor if
        the state is Sta1 (idle) and wait for its thread to end."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def _wait(self) -> None:
        """Block until the peer sent data or something woke the reactor, or at most
        :data:`DUL_WAIT_S` (pynetdicom sleeps 1 ms without looking at the socket)."""
        if self.to_provider_queue.qsize() or self.event_queue.qsize() or self._kill_thread:
            return
        sock = self.socket
        raw = getattr(sock, "socket", None) if sock is not None else None
        pair = self._wake_pair
        if raw is None or pair is None or not getattr(sock, "_is_connected", False):
            time.sleep(_DUL_IDLE_WAIT_S)
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            ready, _, _ = select.select([raw, pair[0]], [], [], DUL_WAIT_S)
        except (OSError, ValueError):  # closed under us: the reactor's own checks handle it
            time.sleep(_DUL_IDLE_WAIT_S)
            return
        if pair[0] in ready:
            _drain(pair[0])

    def _notify_user(self) -> None:
        """Wake the association reactor: an ACSE primitive (release/abort) is waiting for it."""
        if self.to_user_queue.qsize():
            cond = self.assoc.dimse.msg_queue.not_empty
            with cond:
                cond.notify_all()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``run_reactor`` with :meth:`_wait` for its 1 ms sleep."""
        # A socket pair rather than raw pipe fds: a closed socket object refuses writes, where
        # a closed fd number could already belong to another file.
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_pair = (r, w)
        try:
            self._reactor_loop()
        finally:
            self._wake_pair = None
            r.close()
            w.close()

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        wait = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True

            if wait:
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom's DUL.run: any error aborts the association
                _dul.LOGGER.error("Exception in DUL.run(), aborting association")
                _dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                self._notify_user()
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue

            self.state_machine.do_action(event)
            self._notify_user()
            wait = False

    def _read_pdu_data(self) -> None:
        """A P-DATA-TF PDU read whole into one buffer, without copies; anything else, and any
        PDU when a handler wants the raw bytes or PDU objects, by pynetdicom's
        ``_read_pdu_data``. The PDU is peeked at (``MSG_PEEK``) to learn its type before
        anything is consumed."""
        sock = getattr(self.socket, "socket", None)
        assoc = self.assoc
        if (type(sock) is not socket.socket or assoc.get_handlers(evt.EVT_DATA_RECV)
                or assoc.get_handlers(evt.EVT_PDU_RECV)):
            return super()._read_pdu_data()
        try:
            head = sock.recv(6, socket.MSG_PEEK)
        except (OSError, ValueError):
            head = b""
        if len(head) < 6 or head[0] != codec.P_DATA_TF_TYPE:
            return super()._read_pdu_data()  # also reports a closed or failed connection
        try:
            self.socket.recv(6)
            (length,) = struct.unpack_from(">I", head, 2)
            body = self.socket.recv(length)
        except (OSError, TimeoutError) as exc:
            _dul.LOGGER.error("Connection closed before the entire PDU was received")
            _dul.LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return None
        if len(body) != length:
            _dul.LOGGER.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of {6 + length} "
                "bytes received)")
            self.event_queue.put("Evt17")
            return None
        try:
            pdu = codec.parse_p_data_tf(body)
        except ValueError as exc:  # answered as any undecodable PDU: Evt19, A-ABORT
            _dul.LOGGER.error(f"Unable to decode the received PDU data: {exc}")
            self.event_queue.put("Evt19")
            return None
        self.event_queue.put("Evt10")
        self._recv_pdu.put(pdu)
        return None


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:  # BlockingIOError: drained
        pass


# -- the DIMSE provider -------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _service_class(class_uid: str) -> type:
    return uid_to_service_class(class_uid)


def _store_rsp(req: C_STORE) -> C_STORE:
    """The response primitive pynetdicom's ``StorageServiceClass.SCP`` starts from."""
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    return rsp


class SCPDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with the fragments kept, C-STORE requests served in the DUL
    thread and status-only C-STORE responses encoded directly (see the module docstring)."""

    #: Serve a complete C-STORE request in the DUL thread that decoded it (:meth:`_serve_inline`).
    inline_store = True
    #: There, serve it with :meth:`_serve_store` (False: pynetdicom's ``_serve_request`` and
    #: service class; the tests compare the two).
    lean_store = True

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom 3.0.4's ``receive_primitive`` with a :class:`.codec.FragmentedDataSet`
        as a new message's data set, and a complete C-STORE request served at once in this
        (the DUL) thread when :meth:`_serve_inline` allows, instead of being queued for the
        association thread."""
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = codec.FragmentedDataSet()

        if _config.STORE_RECV_CHUNKED_DATASET:
            complete = self.message.decode_msg(primitive, self.assoc)
        else:
            complete = codec.decode_msg(self.message, primitive)
        if not complete:
            return
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
        elif not self._serve_inline(d_primitive, context_id):
            self.msg_queue.put((context_id, d_primitive))

    def _serve_inline(self, primitive: Any, context_id: int) -> bool:
        """Serve a C-STORE request in this (the DUL) thread if that keeps pynetdicom's order:
        the association thread (:class:`SCPAssociation`, which marks itself while it serves a
        request) runs its reactor (so the association is established: until then the
        association thread may still be negotiating), holds no request and serves none, on an
        accepted context. Returns False where the request must go to the association's
        queue."""
        assoc = self.assoc
        if not (self.inline_store and type(primitive) is C_STORE
                and primitive.MessageIDBeingRespondedTo is None and assoc._reactor_running
                and context_id in assoc._accepted_cx and not assoc._sent_release):
            return False
        msg_queue = self.msg_queue
        with msg_queue.mutex:
            if msg_queue._qsize() or assoc._serving:
                return False
            assoc._serving = True
        try:
            if not (self.lean_store and self._serve_store(primitive, context_id)):
                assoc._serve_request(primitive, context_id)
        except Exception as exc:  # noqa: BLE001 - the association thread would have died of it
            log.error("C-STORE service failed in the DUL thread; aborting the association",
                      extra={"error": f"{type(exc).__name__}: {exc}"})
            assoc.abort(block=False)
        finally:
            assoc.dul._idle_timer.restart()  # as if the request had been served just now
            with msg_queue.mutex:
                assoc._serving = False
        return True

    def _serve_store(self, req: C_STORE, context_id: int) -> bool:
        """pynetdicom 3.0.4's ``Association._serve_request`` and ``StorageServiceClass.SCP``
        for a C-STORE request served in the DUL thread (PS3.4 annex B), without the service
        class objects: the handler bound to ``EVT_C_STORE`` is called as pynetdicom calls it
        (``evt.trigger``, with ``abort`` non-blocking meanwhile, an exception answered
        0xC211), and a status it returns as an ``int`` is answered with a directly encoded
        response (:meth:`_send_store_rsp`); a status ``Dataset`` goes through pynetdicom's
        ``validate_status`` and ``send_msg``. False where pynetdicom's own path must serve it:
        a request that is not valid, SOP Class Common Extended Negotiation, pynetdicom's
        unrestricted storage service, a SOP class whose service is not Storage, a data set
        written to a file (``STORE_RECV_CHUNKED_DATASET``)."""
        if _config.UNRESTRICTED_STORAGE_SERVICE or _config.STORE_RECV_CHUNKED_DATASET:
            return False
        assoc = self.assoc
        class_uid = req.AffectedSOPClassUID
        if (class_uid is None or class_uid in assoc.acceptor.accepted_common_extended
                or _service_class(class_uid) is not StorageServiceClass
                or not req.is_valid_request):
            return False
        context = assoc._accepted_cx[context_id]
        self.cancel_req = {}
        assoc._is_paused = True
        assoc.abort = assoc._abort_nonblocking
        try:
            try:
                status = evt.trigger(assoc, evt.EVT_C_STORE,
                                     {"request": req, "context": context.as_tuple})
            except Exception as exc:  # noqa: BLE001 - as pynetdicom's ``attempt``: answered
                _service_class_mod.LOGGER.error(
                    "Exception in handler bound to 'evt.EVT_C_STORE'")
                _service_class_mod.LOGGER.exception(exc)
                self._send_store_rsp(context_id, req, 0xC211)
                return True
        finally:
            assoc.abort = assoc._abort_blocking
            assoc._is_paused = False
            self.cancel_req = {}
        if not assoc.is_established:   # the handler aborted (or released) the association
            return True
        if type(status) is int:
            if status not in STORAGE_SERVICE_CLASS_STATUS:
                _service_class_mod.LOGGER.warning(
                    f"Unknown status value returned by callback - 0x{status:04X}")
            self._send_store_rsp(context_id, req, status)
            return True
        rsp = StorageServiceClass(assoc).validate_status(status, _store_rsp(req))
        self.send_msg(rsp, context_id)
        return True

    def _send_store_rsp(self, context_id: int, req: C_STORE, status: int) -> None:
        """A status-only C-STORE response (PS3.7 9.3.1.2), as ``send_msg`` sends it; from the
        DUL thread in Sta6 with nothing queued before it and no handler bound to the events of
        sending, written to the socket at once as one P-DATA-TF PDU (PS3.8 9.3.5: one PDV, the
        last fragment of a command) instead of queued for the DUL's next pass."""
        command = codec.c_store_rsp_command(req.AffectedSOPClassUID, req.MessageID, status,
                                            req.AffectedSOPInstanceUID)
        dul = self.dul
        assoc = self.assoc
        max_pdu = self.maximum_pdu_size
        if (threading.current_thread() is dul and dul.state_machine.current_state == "Sta6"
                and not dul.to_provider_queue.qsize() and not dul.event_queue.qsize()
                and (not max_pdu or len(command) + 7 <= max_pdu)
                and not assoc.get_handlers(evt.EVT_PDU_SENT)
                and not assoc.get_handlers(evt.EVT_DATA_SENT)
                and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
                and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)):
            dul.socket.send(codec.p_data_tf_command(context_id, command))
            return
        rsp = _store_rsp(req)
        rsp.Status = status
        self.send_msg(rsp, context_id)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A status-only C-STORE response as one PDV, encoded directly; anything else, or any
        message when ``EVT_DIMSE_SENT`` has a handler, by pynetdicom's ``send_msg``."""
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                and primitive.OffendingElement is None and primitive.ErrorComment is None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            command = codec.c_store_rsp_command(primitive.AffectedSOPClassUID,
                                                primitive.MessageIDBeingRespondedTo,
                                                primitive.Status,
                                                primitive.AffectedSOPInstanceUID)
            max_pdu = self.maximum_pdu_size
            if not max_pdu or len(command) + 7 <= max_pdu:  # one PDV item: 4 + 1 + 1 + command
                pdata = P_DATA()
                pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


# -- the association ----------------------------------------------------------------------------
class SCPAssociation(Association):
    """An acceptor association of the storage SCP with :class:`SCPDUL` and :class:`SCPDIMSE`
    and an event-driven reactor (see the module docstring)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        # pynetdicom's __init__ makes its own providers (not started: they are dropped here);
        # the timeouts it set on the DUL's timers are set again on ours.
        self.dul = SCPDUL(self)
        self.dimse = SCPDIMSE(self)
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        #: The association thread holds or serves a request (SCPDIMSE serves a C-STORE in the
        #: DUL thread only while this is False; read and written under the DIMSE queue's lock).
        self._serving = False
        #: The association thread runs :meth:`_run_reactor` (the association is established).
        self._reactor_running = False

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor`` with a wait on the DIMSE queue for
        the ``time.sleep(0.001)`` before each pass."""
        msg_queue = self.dimse.msg_queue
        cond = msg_queue.not_empty
        self._is_paused = False
        self._reactor_running = True
        while not self._kill:
            # Waiting here the reactor does not touch the queue: count as paused, so that a
            # send_c_*() of another thread (which pauses us, then reads the queue) goes on.
            self._is_paused = True
            with cond:
                if not msg_queue._qsize():
                    cond.wait(_ASSOC_WAIT_S)
                if msg_queue._qsize() and not self._reactor_checkpoint.is_set():
                    # Paused: the wake-up was meant for the thread that paused us.
                    cond.notify()
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._kill:
                break

            # Taken and marked as being served in one step, under the queue's lock: the DUL
            # thread serves a C-STORE only while this thread neither holds nor is about to
            # serve a request (responses keep the requests' order).
            with msg_queue.mutex:
                if msg_queue._qsize():
                    context_id, msg = msg_queue._get()
                    self._serving = True
                else:
                    context_id, msg = None, None
            if msg:
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    with msg_queue.mutex:
                        self._serving = False

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _association.LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _association.LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired() and not self._serving:
                # (not while the DUL thread serves a request: pynetdicom's reactor does not look
                # at the timer while it serves one either)
                _association.LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


# -- the request handler ------------------------------------------------------------------------
#: pynetdicom's standard handlers that format every PDU and DIMSE message for its INFO and
#: DEBUG logs (what ``_config.LOG_HANDLER_LEVEL = "standard"`` binds to every association).
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


def unbind_standard_log_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's standard log handlers from ``assoc`` unless the ``pynetdicom``
    logger would show what they format (the node keeps it at WARNING, dicom_node.logging):
    they cost CPU per PDU, and a handler bound to ``EVT_PDU_RECV`` also turns the fast PDU read
    off. Through ``Association.unbind``: the storage SCP's associations only."""
    if _association.LOGGER.isEnabledFor(logging.INFO):  # they log at INFO and DEBUG
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        assoc.unbind(event, handler)


class QuietRequestHandler(RequestHandler):
    """pynetdicom's request handler (stock association, DUL, DIMSE and socket), with its
    standard log handlers unbound from each association as :func:`unbind_standard_log_handlers`
    says: ``node.fast_path = false``."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        unbind_standard_log_handlers(assoc)
        return assoc


class FastRequestHandler(RequestHandler):
    """Creates the storage SCP's associations as :class:`SCPAssociation` on an
    :class:`SCPSocket`: pynetdicom 3.0.4's ``RequestHandler._create_association`` with those
    two classes for ``Association`` and ``AssociationSocket``."""

    def _create_association(self) -> Association:
        assoc = SCPAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = SCPSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        # Association Acceptor object -> local AE
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        # Association Requestor object -> remote AE
        assoc.requestor.address_info = self.remote

        # Bind events to handlers
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        unbind_standard_log_handlers(assoc)
        return assoc
