"""dicom_node.fast_dul: the DUL reactor's wait ends on the wake-up, not on its timeout.

With the wake-up the DUL reactor waits up to ``_DUL_WAKE_WAIT_S`` in ``select()``; whatever it
must act on (a PDU to send, a stop or kill) wakes it. Here the timeout is raised to 5 s: a
missing wake-up on any step (the C-ECHO response, the release, the end of both reactors)
would make the exchange take at least 5 s, with the wake-ups it takes milliseconds.
"""
from __future__ import annotations

import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node import fast_dul

SLOW_TIMEOUT_S = 5.0


@pytest.fixture()
def patched(monkeypatch):
    if not fast_dul.install():
        pytest.skip("fast_dul not installed for this pynetdicom version")
    if not fast_dul._wake_enabled:
        pytest.skip("wake-up part disabled (SPINE_FAST_DUL_PARTS)")
    monkeypatch.setattr(fast_dul, "_DUL_WAKE_WAIT_S", SLOW_TIMEOUT_S)


def test_echo_release_and_abort_are_not_held_by_the_wait_timeout(patched):
    scp = AE(ae_title="FASTDULSCP")
    scp.add_supported_context(Verification)
    echoes = []
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, lambda e: echoes.append(1) or 0)])
    try:
        port = server.server_address[1]
        scu = AE(ae_title="FASTDULSCU")
        scu.add_requested_context(Verification)
        start = time.monotonic()
        assoc = scu.associate("127.0.0.1", port, ae_title="FASTDULSCP")
        assert assoc.is_established
        for _ in range(3):
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released
        assoc.dul.join(timeout=2 * SLOW_TIMEOUT_S)
        assert not assoc.dul.is_alive()
        # An abort ends the acceptor's side too.
        assoc2 = scu.associate("127.0.0.1", port, ae_title="FASTDULSCP")
        assert assoc2.is_established
        assoc2.abort()
        assert assoc2.is_aborted
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 2 * SLOW_TIMEOUT_S
        while scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        server_side_closed = time.monotonic() - start
    finally:
        server.shutdown()
    assert echoes == [1, 1, 1]
    # Each step above would wait out the 5 s timeout without its wake-up.
    assert elapsed < SLOW_TIMEOUT_S / 2, elapsed
    assert server_side_closed < SLOW_TIMEOUT_S, server_side_closed


def test_recv_does_not_allocate_what_a_pdu_header_only_announces():
    """A peer's PDU header may announce up to 4 GiB; the read must not reserve it up front
    (a hostile header would otherwise cost that much memory before any byte arrives)."""
    import socket as _socket
    import tracemalloc
    if not fast_dul.install():
        pytest.skip("fast_dul not installed for this pynetdicom version")
    a, b = _socket.socketpair()

    class Sock:  # what AssociationSocket.recv uses: .socket
        socket = a

    try:
        payload = bytes(range(256)) * 12_000           # 3 MB: grows past the first buffer

        def send():
            b.sendall(payload)
            b.close()

        import threading
        sender = threading.Thread(target=send)
        tracemalloc.start()
        sender.start()
        got = fast_dul._recv(Sock(), 2**31)              # announced 2 GiB, 3 MB then closed
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sender.join(timeout=10)
    finally:
        a.close()
    assert bytes(got) == payload
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a 3 MB read"
