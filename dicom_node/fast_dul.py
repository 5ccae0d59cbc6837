"""Event-driven waits for pynetdicom 3.0's two polling loops (issue 8, ingest speed).

Why this module exists: pynetdicom 3.0.4 moves every message between threads by polling.
The DUL reactor (``DULServiceProvider.run_reactor``) sleeps 1 ms whenever a pass finds nothing
to do, and the association reactor (``Association._run_reactor``) sleeps 1 ms before every
look at the DIMSE queue; the upstream code says so itself ("TODO: try and make this event
based rather than running loops"). On a loaded two-core machine a 1 ms sleep lasts several
milliseconds, and a C-STORE crosses those loops several times (each P-DATA PDU, the complete
message, the response on its way out): py-spy showed ~2.6 of 3.9 s of a 300-slice transfer
asleep in them, and the rest partly spent polling. Socket reads are also done 4 KiB at a time.

What :func:`install` changes, for every association of the process (SCP and SCU alike), and
nothing else:

- the DUL reactor, instead of sleeping 1 ms, waits in ``select()`` on the peer socket and on a
  wake-up socket pair: data from the peer is read the moment it arrives, and ``send_pdu`` (a
  primitive to send, e.g. the C-STORE response), ``kill_dul`` and ``stop_dul`` wake it at
  once instead of after up to 1 ms. As nothing waits on the timeout any more, it is 50 ms
  (it only bounds how late an expired ARTIM timer is seen), so an idle association's DUL
  thread no longer takes the GIL 1000 times a second (four concurrent senders: node CPU
  1.17 vs 1.32 s, wall 1.12 vs 1.22 s; docs/archive/bench-history.md). Measured on a quiet machine, a
  pynetdicom SCP that answers at once took 0.48-0.50 s for 300 instances with the wake-up
  and 0.73-0.74 s without (`bench/scp_floor.py`; docs/archive/bench-history.md). An earlier wake-up
  through a pipe had measured slower on the machine loaded to 6-9 (the woken DUL thread
  competing for the GIL); on the quiet machine the full node gained little but lost nothing,
  so the wake-up stays, and ``SPINE_FAST_DUL_PARTS=dul+assoc+recv`` leaves it out.
- the association reactor blocks on the DIMSE message queue's condition instead of sleeping
  before each look, and is marked paused while it waits (it is not touching the queue), so
  that ``send_c_*`` from another thread need not wait for it either. It takes a request off
  the queue and marks itself as serving it in one step (``_spn_serving``), which
  :mod:`dicom_node.fast_dimse` checks before it serves a C-STORE in the DUL thread. The DUL
  reactor wakes it when it hands the service user an A-RELEASE/A-ABORT, so releases are
  answered at once.
- ``AssociationSocket.recv`` reads a whole PDU with ``recv_into`` into one buffer (1 MiB at
  first, doubled as data arrives: a PDU header that announces gigabytes costs nothing until
  they come).

The state machine, the PDU and DIMSE code and every event are pynetdicom's own: the two
reactor loops below are copies of 3.0.4's with only the waits replaced. :func:`install`
refuses to patch another pynetdicom version (the loops would no longer be copies), and then
the node simply runs on the polling loops. For diagnosis, ``SPINE_FAST_DUL=0`` keeps
pynetdicom's loops and ``SPINE_FAST_DUL_PARTS=dul+assoc+recv`` picks the parts.
"""
from __future__ import annotations

import os
import queue
import select
import socket
import ssl
import threading
import time
from typing import cast

import pynetdicom
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

from dicom_node.logging import get_logger

log = get_logger("spine_node.fast_dul")

#: pynetdicom versions whose reactor loops the copies below match.
SUPPORTED_VERSIONS = ("3.0.4",)
#: Longest the DUL reactor waits on the socket without the wake-up: a primitive to send (a
#: C-STORE response) is seen after at most this long, as with pynetdicom's own 1 ms sleep.
_DUL_WAIT_S = 0.001
#: Longest it waits with the wake-up (the default): whatever it must act on wakes it at once
#: (data from the peer, ``send_pdu``, ``kill_dul``/``stop_dul``), so the timeout only bounds how
#: late an expired ARTIM timer is noticed. A 1 ms timeout here had every idle association's
#: DUL thread take the GIL 1000 times a second, which four concurrent senders felt.
_DUL_WAKE_WAIT_S = 0.05
#: Longest the association reactor waits without a wake-up (idle timer, local abort).
_ASSOC_WAIT_S = 0.02

_installed = False
_wake_enabled = False
_install_lock = threading.Lock()


# -- DUL reactor ----------------------------------------------------------------------------
def _dul_wait(dul: DULServiceProvider) -> None:
    """Block until the peer sent data or something woke the reactor, or at most
    ``_DUL_WAKE_WAIT_S`` (``_DUL_WAIT_S`` without the wake-up; pynetdicom sleeps 1 ms without
    looking at the socket)."""
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize() or dul._kill_thread:
        return
    sock = dul.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is None or not getattr(sock, "_is_connected", False):
        time.sleep(_DUL_WAIT_S)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return  # decrypted bytes already buffered: select would not see them
    wake = getattr(dul, "_spn_wake", None)
    try:
        if wake is None:
            ready, _, _ = select.select([raw], [], [], _DUL_WAIT_S)
        else:
            ready, _, _ = select.select([raw, wake[0]], [], [], _DUL_WAKE_WAIT_S)
    except (OSError, ValueError):  # closed under us: the reactor's own checks handle it
        time.sleep(_DUL_WAIT_S)
        return
    if wake is not None and wake[0] in ready:
        _drain(wake[0])


# -- wake-up: a primitive to send (the C-STORE response) ends the DUL's wait at once ----------
_orig_send_pdu = DULServiceProvider.send_pdu
_orig_kill_dul = DULServiceProvider.kill_dul


def _open_wake(dul: DULServiceProvider) -> None:
    # A socket pair rather than raw pipe fds: a closed socket object refuses writes, where a
    # closed fd number could already belong to another file.
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    dul._spn_wake = (r, w)


def _close_wake(dul: DULServiceProvider) -> None:
    wake = getattr(dul, "_spn_wake", None)
    dul._spn_wake = None
    if wake is not None:
        for sock in wake:
            sock.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:  # BlockingIOError: drained
        pass


def _wake(dul: DULServiceProvider) -> None:
    """End the DUL reactor's wait now (a no-op once its reactor has ended)."""
    wake = getattr(dul, "_spn_wake", None)
    if wake is not None:
        try:
            wake[1].send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the reactor ended)
            pass


def _send_pdu(self: DULServiceProvider, primitive) -> None:  # noqa: ANN001
    """pynetdicom's ``send_pdu`` (queue the primitive), then wake the DUL reactor's wait
    (not needed when the DUL thread queues it itself: its next pass sends it)."""
    _orig_send_pdu(self, primitive)
    if threading.current_thread() is not self:
        _wake(self)


def _kill_dul(self: DULServiceProvider) -> None:
    """pynetdicom's ``kill_dul`` (flag the reactor to stop), then wake it to see the flag."""
    _orig_kill_dul(self)
    _wake(self)


def _stop_dul(self: DULServiceProvider) -> bool:
    """pynetdicom 3.0.4's ``stop_dul`` with a wake-up after the flag: stop the reactor if the
    state is Sta1 (idle) and wait for its thread to end."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _wake(self)
        while self.is_alive():
            time.sleep(self._run_loop_delay)
        return True
    return False


def _notify_user(dul: DULServiceProvider) -> None:
    """Wake the association reactor: an ACSE primitive (release/abort) is waiting for it."""
    if dul.to_user_queue.qsize():
        dimse = getattr(dul.assoc, "dimse", None)
        if dimse is not None:
            cond = dimse.msg_queue.not_empty
            with cond:
                cond.notify_all()


def _run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4 ``DULServiceProvider.run_reactor`` with ``_dul_wait`` for the sleep."""
    if _wake_enabled:
        _open_wake(self)
    try:
        _reactor_loop(self)
    finally:
        _close_wake(self)


def _reactor_loop(self: DULServiceProvider) -> None:
    self._idle_timer.start()
    self.socket = cast(AssociationSocket, self.socket)
    wait = False

    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            wait = True

        if wait:
            _dul_wait(self)

        if self._kill_thread:
            break

        if self.artim_timer.expired:
            self.event_queue.put("Evt18")

        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception as exc:
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
            _notify_user(self)
            return

        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            wait = True
            continue

        self.state_machine.do_action(event)
        _notify_user(self)
        wait = False


# -- association reactor --------------------------------------------------------------------
def _assoc_run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4 ``Association._run_reactor`` with a wait on the DIMSE queue for the
    ``time.sleep(0.001)`` before each pass."""
    msg_queue = self.dimse.msg_queue
    cond = msg_queue.not_empty
    self._is_paused = False
    self._spn_serving = False
    self._spn_reactor = True  # dicom_node.fast_dimse may serve a C-STORE in the DUL thread
    while not self._kill:
        # Waiting here the reactor does not touch the queue: count as paused, so that a
        # send_c_*() of another thread (which pauses us, then reads the queue) goes on at once.
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

        # Taken and marked as being served in one step, under the queue's lock:
        # dicom_node.fast_dimse serves a C-STORE in the DUL thread only while this thread is
        # neither holding nor about to serve a request (responses keep the requests' order).
        with msg_queue.mutex:
            if msg_queue._qsize():
                context_id, msg = msg_queue._get()
                self._spn_serving = True
            else:
                context_id, msg = None, None
        if msg:
            try:
                self._serve_request(msg, cast(int, context_id))
            finally:
                with msg_queue.mutex:
                    self._spn_serving = False

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            pynetdicom.association.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            pynetdicom.association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired() and not self._spn_serving:
            # (not while the DUL thread serves a request: pynetdicom's reactor does not look at
            # the timer while it serves one either)
            pynetdicom.association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# -- socket reads ---------------------------------------------------------------------------
_orig_recv = AssociationSocket.recv
#: The first buffer of a read (larger than any PDU the node negotiates, node.max_pdu 256 KiB).
_RECV_FIRST = 1 << 20


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` (fewer only if the peer closed), in as few system calls as the
    kernel allows instead of 4 KiB at a time. Plain TCP sockets only: a TLS socket (whose
    ``recv`` may do more, e.g. dicom_node.tls's deferred handshake) keeps pynetdicom's read."""
    sock = self.socket
    if type(sock) is not socket.socket:
        return _orig_recv(self, nr_bytes)
    # The length comes from the peer's PDU header (up to 4 GiB, whatever was negotiated):
    # the buffer grows with what actually arrives, never ahead of it by more than it holds.
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


# -- install --------------------------------------------------------------------------------
def may_patch(module: str, env_var: str, kept: str) -> bool:
    """Whether ``module`` may patch pynetdicom in this process: not turned off by ``env_var=0``
    (diagnosis and benchmarks) and pynetdicom a version whose code it was written against.
    Logs why not, with what stays (``kept``)."""
    if os.environ.get(env_var, "1") == "0":
        log.warning(f"{env_var}=0: pynetdicom's {kept}")
        return False
    if pynetdicom.__version__ not in SUPPORTED_VERSIONS:
        log.warning(f"pynetdicom version not supported by {module}, its {kept}",
                    extra={"version": pynetdicom.__version__})
        return False
    return True


def install() -> bool:
    """Patch pynetdicom (once per process); False if its version is not one we copied."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        if not may_patch("fast_dul", "SPINE_FAST_DUL", "polling loops kept"):
            return False
        global _wake_enabled
        parts = set(os.environ.get("SPINE_FAST_DUL_PARTS", "dul+assoc+recv+wake")
                    .replace(",", "+").split("+"))
        if "dul" in parts:
            DULServiceProvider.run_reactor = _run_reactor
            if "wake" in parts:
                _wake_enabled = True
                DULServiceProvider.send_pdu = _send_pdu
                DULServiceProvider.kill_dul = _kill_dul
                DULServiceProvider.stop_dul = _stop_dul
        if "assoc" in parts:
            Association._run_reactor = _assoc_run_reactor
        if "recv" in parts:
            AssociationSocket.recv = _recv
        _installed = True
        return True
