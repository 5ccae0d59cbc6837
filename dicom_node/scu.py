"""C-STORE SCU: send stored result files to one destination over one association.

Every wait is bounded (pynetdicom's timeouts): TCP connect (``connect_timeout_s``), association
negotiation (``acse_timeout_s``), each DIMSE response (``dimse_timeout_s``) and network silence
(``network_timeout_s``). A destination that refuses, rejects or hangs therefore costs at most
those seconds and an error string, never a stuck thread.

Presentation contexts: one per SOP class of the files to send (SEG, Comprehensive 3D SR,
Secondary Capture, ...), offering the file's own transfer syntax first and then the two
uncompressed ones, so that a peer which only takes Implicit VR Little Endian still gets them
(pynetdicom re-encodes an uncompressed dataset for the accepted syntax).
"""
from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.status import code_to_category

#: Our PDU size: big PDUs mean fewer Python round trips for a multi-MB SEG.
MAX_PDU = 262144
#: pynetdicom allows at most 128 presentation contexts per association (PS3.8 9.3.2.2: odd ids).
MAX_CONTEXTS = 128


class StoreError(Exception):
    """No association (refused, rejected, aborted or timed out); the message says which."""


@dataclass(frozen=True)
class Peer:
    """Where to send: the ``[[destinations]]`` entry."""

    ae_title: str
    host: str
    port: int
    name: str = ""
    #: DICOM TLS towards this peer (``[[destinations]] tls = true``); None: plain DICOM.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, hash=False,
                                               repr=False)

    @classmethod
    def from_destination(cls, d) -> "Peer":
        from dicom_node.tls import destination_context
        return cls(ae_title=d.ae_title, host=d.host, port=int(d.port), name=d.name,
                   ssl_context=destination_context(d))

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        return (self.ssl_context, self.host) if self.ssl_context is not None else None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0

    @classmethod
    def from_settings(cls, exporter) -> "Timeouts":
        network = getattr(exporter, "network_timeout_s", None) or exporter.dimse_timeout_s
        connect = getattr(exporter, "connect_timeout_s", None) or min(10.0,
                                                                      exporter.acse_timeout_s)
        return cls(connect_s=connect, acse_s=exporter.acse_timeout_s,
                   dimse_s=exporter.dimse_timeout_s, network_s=network)


@dataclass(frozen=True)
class StoreOutcome:
    """What the destination answered for one file."""

    path: Path
    sop_instance_uid: str
    ok: bool
    status: int | None
    error: str | None = None


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _describe(path: Path) -> _Item:
    """SOP class/instance and transfer syntax of a Part 10 file (the File Meta only)."""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    return _Item(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                 str(meta.TransferSyntaxUID))


def presentation_contexts(items: Sequence[_Item]) -> list:
    """One context per SOP class: the files' transfer syntaxes, then the uncompressed ones."""
    syntaxes: dict[str, list[str]] = {}
    for it in items:
        offered = syntaxes.setdefault(it.sop_class_uid, [])
        for ts in (it.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in offered:
                offered.append(ts)
    if len(syntaxes) > MAX_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes in one association (at most "
                         f"{MAX_CONTEXTS})")
    return [build_context(sop_class, ts) for sop_class, ts in syntaxes.items()]


def _status_text(status: int) -> str:
    category = code_to_category(status)
    return f"{category} 0x{status:04X}"


def _why_no_association(assoc, peer: Peer, timeouts: Timeouts) -> str:
    """A sentence for the failed association (pynetdicom reports refusals as aborts)."""
    if assoc.is_rejected:
        return f"{peer} rejected the association (check our AE title and its called AE title)"
    try:  # was anything listening at all?
        with socket.create_connection((peer.host, peer.port), timeout=timeouts.connect_s):
            pass
    except ConnectionRefusedError:
        return f"no association with {peer}: connection refused (nothing listens there)"
    except OSError as exc:
        return f"no association with {peer}: cannot connect ({exc})"
    if peer.ssl_context is not None:
        return (f"no association with {peer} over TLS: the handshake or the association "
                "failed (check the certificates and CAs on both sides)")
    return (f"no association with {peer}: it accepted the connection but did not accept the "
            f"association within {timeouts.acse_s:g} s (aborted or timed out)")


def store_files(paths: Sequence[str | Path], peer: Peer, *, calling_ae: str,
                timeouts: Timeouts = Timeouts()) -> list[StoreOutcome]:
    """C-STORE ``paths`` to ``peer`` over one association, in order.

    Returns one outcome per file (Success and Warning statuses count as delivered, PS3.4
    B.2.3). Raises :class:`StoreError` when no association could be made; if the association
    breaks mid-way, the files not sent get a failed outcome with the reason.
    """
    items = [_describe(Path(p)) for p in paths]
    if not items:
        return []
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.maximum_pdu_size = MAX_PDU
    ae.requested_contexts = presentation_contexts(items)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, max_pdu=MAX_PDU,
                         tls_args=peer.tls_args)
    if not assoc.is_established:
        raise StoreError(_why_no_association(assoc, peer, timeouts))
    outcomes: list[StoreOutcome] = []
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for it in items:
            if it.sop_class_uid not in accepted:
                outcomes.append(StoreOutcome(it.path, it.sop_instance_uid, False, None,
                                             f"{peer} does not accept SOP class "
                                             f"{UID(it.sop_class_uid).name}"))
                continue
            if not assoc.is_established:
                outcomes.append(StoreOutcome(it.path, it.sop_instance_uid, False, None,
                                             f"association with {peer} ended before sending"))
                continue
            try:
                rsp = assoc.send_c_store(it.path)
            except Exception as exc:  # noqa: BLE001 - a broken file or socket: this file fails
                outcomes.append(StoreOutcome(it.path, it.sop_instance_uid, False, None,
                                             f"sending failed: {type(exc).__name__}: {exc}"))
                continue
            status = getattr(rsp, "Status", None) if rsp else None
            if status is None:
                outcomes.append(StoreOutcome(it.path, it.sop_instance_uid, False, None,
                                             f"no C-STORE response from {peer} within "
                                             f"{timeouts.dimse_s:g} s (association aborted)"))
                continue
            status = int(status)
            category = code_to_category(status)
            ok = category in ("Success", "Warning")
            outcomes.append(StoreOutcome(it.path, it.sop_instance_uid, ok, status,
                                         None if ok else f"{peer} answered {_status_text(status)}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def echo(peer: Peer, *, calling_ae: str, timeouts: Timeouts = Timeouts()) -> int:
    """C-ECHO ``peer``; returns the status (0 = success). Raises :class:`StoreError`."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=peer.tls_args)
    if not assoc.is_established:
        raise StoreError(_why_no_association(assoc, peer, timeouts))
    try:
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            raise StoreError(f"no C-ECHO response from {peer}")
        return int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()
