"""Storage SCP: receives CT by C-STORE and answers Success only once the instance is durable.

The C-STORE handler stays small (STYLE.md, pynetdicom): validate the UIDs and SOP class from
the header (pixel data is never decoded here), write the encoded bytes exactly as received
(no re-encoding) through :class:`storage.ingest.InstanceWriter` (the received fragments
written with fdatasync under the final name, or to a temporary file renamed there; directory
fsync and index commit grouped with concurrent instances), and only then answer Success. A SOP
Instance UID already held is answered Success without a second copy. Below the free-space floor
the answer is Out of Resources (0xA700) and nothing is written.

With ``node.fast_path`` (the default) the listener's associations are those of
:mod:`dicom_node.fastpath.hooks` (subclasses of pynetdicom's, created by this SCP's server only:
event-driven waits, the data set kept as the received fragments, this handler run in the
association's DUL thread, responses encoded directly); so the handler must not block on its
own association (no ``send_c_*``, no blocking ``abort``), which a storage SCP has no reason to
do. With ``node.fast_path = false`` they are stock pynetdicom.
"""
from __future__ import annotations

import enum
import ipaddress
import os
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from config import Settings
from dicom_node import audit, metrics, part10
from dicom_node.acceptors import start_server
from dicom_node.fastpath.codec import fragments_of
from dicom_node.logging import get_logger
from storage.files import BlobStore, OutOfSpaceError
from storage.index import Index, InstanceRecord
from storage.ingest import InstanceWriter, Outcome
from storage.uids import InvalidUIDError, clean_uid, validate_uid

log = get_logger("spine_node.scp")

# pynetdicom must not log identifiers from requests.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: Transfer syntaxes we accept, and store exactly as received.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,  # JPEGLossless = P14
    JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000,
    RLELossless,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K,
]

CT_STORAGE_CLASSES: list[str] = [CTImageStorage, EnhancedCTImageStorage]

#: Header tags the index needs; parsing stops before the pixel data.
_HEADER_TAGS = [0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00200013,
                0x00280008]


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses we send (PS3.4 B.2.3, Storage Service Class)."""

    SUCCESS = 0x0000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


def _host_allowed(host: str, networks: list) -> bool:
    """Is the peer address in one of the ``node.allowed_hosts`` addresses or networks?"""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def _response(status: StoreStatus, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        # ErrorComment is LO: 64 characters, no backslash.
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


class _AssocStats:
    __slots__ = ("calling_ae", "host", "stored", "duplicates", "refused", "bytes", "started")

    def __init__(self, calling_ae: str, host: str):
        self.calling_ae, self.host = calling_ae, host
        self.stored = self.duplicates = self.refused = self.bytes = 0
        self.started = time.monotonic()


class StorageSCP:
    """The listener: ``start()`` returns at once, ``drain()`` stops it cleanly."""

    def __init__(self, settings: Settings, index: Index | None, store: BlobStore | None):
        """``index`` and ``store`` may be ``None`` only for a listener that negotiates and
        never stores: the conformance statement's generator reads its contexts that way."""
        self.settings = settings
        self.index = index
        self.store = store
        self.writer = (InstanceWriter.from_settings(settings, store, index)
                       if index is not None and store is not None else None)
        node = settings.node
        self.allowed_aes = {ae.strip() for ae in node.allowed_calling_aes}
        self.allowed_hosts = [ipaddress.ip_network(h, strict=False) for h in node.allowed_hosts]
        self.storage_classes = set(CT_STORAGE_CLASSES) | set(node.extra_storage_sop_classes)
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.server = None
        self.tls_server = None  # a second listener when node.tls.port is set

        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        for sop_class in sorted(self.storage_classes):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                ExplicitVRBigEndian])
        self.ae = ae

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, listen_fd: int | None = None) -> None:
        """Listen on ``node.host``:``node.port`` (and ``node.tls.port``), or with ``listen_fd``
        accept on a listening socket inherited from ``serve`` (:mod:`dicom_node.acceptors`).

        With ``node.acceptor_processes`` > 1 every process defers its ``accept`` a little per
        association it is already serving, so that a new sender goes to the least busy one.
        ``node.fast_path`` picks the associations' classes (:mod:`dicom_node.fastpath.hooks`
        or stock pynetdicom) for these listeners only.
        """
        handlers = [(evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_limit_rejected),
                    (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_CONN_CLOSE, self._on_close)]
        node = self.settings.node
        ssl_context = None
        if node.tls.enabled:
            from dicom_node.tls import server_context
            ssl_context = server_context(node.tls, io_timeout=node.network_timeout_s,
                                         on_failure=self._on_tls_failure)
        tls_only = ssl_context is not None and not node.tls.port
        self.server = start_server(self.ae, (node.host, node.port), evt_handlers=handlers,
                                   ssl_context=ssl_context if tls_only else None,
                                   fast_path=node.fast_path, listen_fd=listen_fd,
                                   defer_when_busy=node.acceptor_processes > 1)
        log.info("storage SCP listening", extra={"ae_title": node.ae_title, "host": node.host,
                                                 "port": self.port, "tls": tls_only,
                                                 "fast_path": self.server.fast_path,
                                                 "pid": os.getpid()})
        if ssl_context is not None and not tls_only and listen_fd is None:
            self.tls_server = start_server(self.ae, (node.host, node.tls.port),
                                           evt_handlers=handlers, ssl_context=ssl_context,
                                           fast_path=node.fast_path)
            log.info("storage SCP listening", extra={"ae_title": node.ae_title,
                                                     "host": node.host, "tls": True,
                                                     "port": self.tls_port})

    @property
    def tls_port(self) -> int | None:
        return self.tls_server.server_address[1] if self.tls_server else None

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.node.port

    def drain(self, timeout_s: float = 30.0) -> None:
        """Stop accepting associations, let the open ones finish, abort what is left."""
        if self.server is None:
            return
        server, self.server = self.server, None
        if self.tls_server is not None:
            tls_server, self.tls_server = self.tls_server, None
            tls_server.shutdown()
        server.shutdown()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Connections that never sent an A-ASSOCIATE-RQ (port probes) are not waited for.
            if not any(a.is_established for a in self.ae.active_associations):
                break
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            if assoc.is_established:
                log.warning("aborting association at shutdown",
                            extra={"calling_ae": assoc.requestor.ae_title})
            assoc.abort()

    # -- association -----------------------------------------------------------------------
    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling = (assoc.requestor.primitive.calling_ae_title or "").strip()
        host = assoc.requestor.address
        reason = None
        if self.allowed_aes and calling not in self.allowed_aes:
            reason, diagnostic = "calling AE title not in node.allowed_calling_aes", 0x03
        elif self.allowed_hosts and not _host_allowed(host, self.allowed_hosts):
            reason, diagnostic = "peer address not in node.allowed_hosts", 0x01
        if reason is None:
            return
        # Rejected permanent, by the service user, with the diagnostic above (PS3.8 9.3.4).
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom does
        metrics.ASSOCIATIONS.labels("rejected").inc()
        audit.association(self.index, calling, host, accepted=False, reason=reason)

    def _on_limit_rejected(self, event) -> None:
        """pynetdicom's own rejection: more than ``node.max_associations`` at once (transient,
        "local limit exceeded"; the peer should retry later)."""
        assoc = event.assoc
        metrics.ASSOCIATIONS.labels("rejected").inc()
        audit.association(self.index, (assoc.requestor.ae_title or "").strip(),
                          assoc.requestor.address, accepted=False,
                          reason=f"node.max_associations = "
                                 f"{self.settings.node.max_associations} reached")

    def _on_tls_failure(self, peer: str, reason: str) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        audit.association(self.index, "", peer, accepted=False,
                          reason=f"TLS handshake failed: {reason}")

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        metrics.ASSOCIATIONS.labels("accepted").inc()
        audit.association(self.index, assoc.requestor.ae_title.strip(),
                          assoc.requestor.address, accepted=True)
        with self._lock:
            self._stats[id(assoc)] = _AssocStats(assoc.requestor.ae_title.strip(),
                                                 assoc.requestor.address)

    def _on_close(self, event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None or not (stats.stored or stats.duplicates or stats.refused):
            return
        details = {"stored": stats.stored, "duplicates": stats.duplicates,
                   "refused": stats.refused, "bytes": stats.bytes,
                   "seconds": round(time.monotonic() - stats.started, 3)}
        log.info("association closed", extra={"calling_ae": stats.calling_ae, "pid": os.getpid(),
                                              **details})
        audit.record(self.index, "instances_received",
                     "success" if not stats.refused else "partial",
                     actor=f"{stats.calling_ae}@{stats.host}", actor_host=stats.host,
                     calling_ae=stats.calling_ae, **details)

    def _on_echo(self, event) -> int:
        return int(StoreStatus.SUCCESS)

    # -- C-STORE ---------------------------------------------------------------------------
    def _on_store(self, event) -> Dataset | int:
        start = time.perf_counter()
        stats = self._stats.get(id(event.assoc))
        status, comment, label = self._store(event, stats)
        metrics.INSTANCES.labels(label).inc()
        metrics.STORE_SECONDS.observe(time.perf_counter() - start)
        if status is StoreStatus.SUCCESS:
            return int(status)
        if stats is not None:
            stats.refused += 1
        log.warning("C-STORE refused", extra={"status": f"0x{int(status):04X}",
                                              "reason": comment})
        return _response(status, comment)

    def _store(self, event, stats) -> tuple[StoreStatus, str, str]:
        req = event.request
        sop_class = clean_uid(req.AffectedSOPClassUID)
        if sop_class not in self.storage_classes:
            return (StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED,
                    f"SOP class {sop_class[:40]} not accepted", "refused")
        transfer_syntax = str(event.context.transfer_syntax)
        # The data set as received: the PDUs' fragments, not copied (fast path), or one buffer
        fragments = fragments_of(req.DataSet)
        return self._store_dataset(req, sop_class, transfer_syntax, fragments, stats)

    def _store_dataset(self, req, sop_class: str, transfer_syntax: str,
                       fragments: list, stats) -> tuple[StoreStatus, str, str]:
        try:
            header = part10.read_header(fragments, transfer_syntax, _HEADER_TAGS)
            study = validate_uid(header.get("StudyInstanceUID"), "Study Instance UID")
            series = validate_uid(header.get("SeriesInstanceUID"), "Series Instance UID")
            sop = validate_uid(header.get("SOPInstanceUID"), "SOP Instance UID")
            validate_uid(req.AffectedSOPInstanceUID, "Affected SOP Instance UID")
        except InvalidUIDError as exc:
            return StoreStatus.CANNOT_UNDERSTAND, str(exc), "refused"
        except Exception as exc:  # noqa: BLE001 - any parse error: the data set is unreadable
            return StoreStatus.CANNOT_UNDERSTAND, f"unreadable data set: {exc}", "refused"
        if sop != clean_uid(req.AffectedSOPInstanceUID):
            return (StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOP Instance UID differs from the C-STORE request", "refused")
        if clean_uid(header.get("SOPClassUID")) != sop_class:
            return (StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOP Class UID differs from the C-STORE request", "refused")

        relpath = self.store.instance_relpath(study, series, sop)
        frames = header.get("NumberOfFrames")
        number = header.get("InstanceNumber")
        try:
            number = int(number) if number not in (None, "") else None
            frames = int(frames) if frames not in (None, "") else 1
        except (TypeError, ValueError):
            number, frames = None, 1
        # PS3.10 file: preamble, DICM, File Meta (as pynetdicom writes it), data set as received
        prefix = part10.file_prefix(sop_class, sop, transfer_syntax)
        record = InstanceRecord(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            sop_class_uid=sop_class, transfer_syntax_uid=transfer_syntax,
            modality=str(header.get("Modality", "") or "").strip(), path=relpath,
            size_bytes=len(prefix) + sum(len(f) for f in fragments), instance_number=number,
            frames=frames, calling_ae=stats.calling_ae if stats else "")
        # Data fdatasynced under its final name (or renamed there), directory synced and row
        # committed (grouped with concurrent instances, storage.ingest) before this returns:
        # then Success.
        try:
            outcome = self.writer.store_instance(record, (prefix, *fragments))
        except OutOfSpaceError as exc:
            return StoreStatus.OUT_OF_RESOURCES, str(exc), "out_of_resources"
        except OSError as exc:
            log.error("instance write failed", extra={"error": str(exc)})
            return StoreStatus.OUT_OF_RESOURCES, f"write failed: {exc.strerror}", \
                "out_of_resources"
        except Exception as exc:
            log.exception("indexing failed")
            return StoreStatus.PROCESSING_FAILURE, f"index failed: {type(exc).__name__}", \
                "error"
        if outcome is Outcome.DUPLICATE:
            if stats is not None:
                stats.duplicates += 1
            return StoreStatus.SUCCESS, "", "duplicate"
        metrics.BYTES.inc(record.size_bytes)
        if stats is not None:
            stats.stored += 1
            stats.bytes += record.size_bytes
        return StoreStatus.SUCCESS, "", "success"

