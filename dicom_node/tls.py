"""DICOM TLS (PS3.15 B.1 "Basic TLS Secure Transport Connection Profile" and B.9 "BCP 195"):
TLS 1.2 or newer, the node's certificate, and the peers' certificates checked against the
hospital CA.

Listener side (``[node.tls]``): pynetdicom wraps each accepted socket with the context's
``wrap_socket`` inside its accept loop. A peer that connects and never finishes the handshake
would hold that loop, and so every other peer, for as long as it likes; :class:`ServerContext`
defers the handshake to the association's own thread (first read), bounded by
``handshake_timeout_s``, and reports a failed handshake (no or an untrusted client certificate,
plain DICOM on the TLS port) to a callback so that it is logged and audited.

Sender side (``[[destinations]] tls = true``): :func:`client_context` for the SCU.
"""
from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

#: Called with (peer address, reason) when a peer fails the handshake.
FailureCallback = Callable[[str, str], None]


class _DeferredHandshakeSocket(ssl.SSLSocket):
    """Does the server-side handshake on the first read, in the association's thread."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._spine_handshake()
        return super().recv(buflen, flags)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        self._spine_handshake()
        return super().recv_into(buffer, nbytes, flags)

    def _spine_handshake(self) -> None:
        if not getattr(self, "_spine_handshake_done", False):
            self._spine_handshake_done = True
            ctx = self.context
            try:
                self.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                report = getattr(ctx, "on_handshake_failure", None)
                if report is not None:
                    try:
                        report(getattr(self, "_spine_peer", "?"), _reason(exc))
                    except Exception:  # noqa: BLE001 - reporting must not change the outcome
                        pass
                raise
            # After the handshake: the node's usual network timeout (a peer that stalls
            # mid-PDU ends its association rather than holding a thread).
            self.settimeout(getattr(ctx, "io_timeout", None))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return f"{type(exc).__name__}: {exc}"


class ServerContext(ssl.SSLContext):
    """A server :class:`ssl.SSLContext` whose sockets hand-shake lazily (see the module)."""

    handshake_timeout: float = 10.0
    io_timeout: float | None = None
    on_handshake_failure: FailureCallback | None = None

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        peer = "?"
        try:
            peer = sock.getpeername()[0]
        except OSError:
            pass
        sock.settimeout(self.handshake_timeout)
        wrapped = super().wrap_socket(sock, server_side=server_side,
                                      do_handshake_on_connect=False,
                                      suppress_ragged_eofs=suppress_ragged_eofs,
                                      server_hostname=server_hostname, session=session)
        wrapped._spine_peer = peer
        return wrapped


def server_context(tls, *, io_timeout: float | None = None,
                   on_failure: FailureCallback | None = None) -> ServerContext:
    """The listener's context from ``[node.tls]``."""
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (
        ssl.CERT_OPTIONAL if tls.ca_file is not None else ssl.CERT_NONE)
    ctx.sslsocket_class = _DeferredHandshakeSocket
    ctx.handshake_timeout = float(tls.handshake_timeout_s)
    ctx.io_timeout = io_timeout
    ctx.on_handshake_failure = on_failure
    return ctx


def client_context(*, ca_file: Path | str | None = None, cert_file: Path | str | None = None,
                   key_file: Path | str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A context for sending to a TLS destination (the destination's certificate checked)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def destination_context(dest) -> ssl.SSLContext | None:
    """The context for a ``[[destinations]]`` entry, or None when it is plain DICOM."""
    if not getattr(dest, "tls", False):
        return None
    return client_context(ca_file=dest.tls_ca_file, cert_file=dest.tls_cert_file,
                          key_file=dest.tls_key_file, check_hostname=dest.tls_check_hostname)


__all__ = ["ServerContext", "server_context", "client_context", "destination_context"]
