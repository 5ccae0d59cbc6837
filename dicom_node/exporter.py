"""The exporter: delivers due deliveries to their destinations by C-STORE, with retries.

One thread per configured destination, separate from the SCP and the workers: a destination
that refuses, rejects or hangs only ever holds its own thread, for at most the SCU timeouts
(:mod:`dicom_node.scu`), and never the reception of images, the analysis or the other
destinations. All state lives in the ``deliveries`` table (:mod:`storage.deliveries`), so a
restart picks up where the last run stopped: pending rows are sent when due, failures back off
exponentially and end ``dead`` after ``exporter.max_attempts``.

:func:`wake` lets :func:`dicom_node.results.publish` start a delivery at once instead of at the
next poll.
"""
from __future__ import annotations

import threading
import time
import weakref

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily

from dicom_node import audit
from dicom_node.logging import get_logger
from dicom_node.scu import Peer, StoreError, Timeouts, store_files
from storage.db import Database, utcnow
from storage.deliveries import Backoff, ClaimedDelivery, DeliveryQueue
from storage.files import BlobStore, UnsafePathError
from storage.index import Index
from storage.queue import new_worker_id

log = get_logger("spine_node.exporter")

DELIVERIES = Counter("spine_node_deliveries", "Delivery attempts by outcome",
                     ["destination", "outcome"])  # delivered | retry | dead



class DeliveriesCollector:
    """``spine_node_deliveries_by_state{state=...}``, read from the database at scrape time
    (right across processes and restarts; a dead delivery needs a person: alert on it)."""

    def __init__(self, queue: DeliveryQueue):
        self.queue = queue

    def collect(self):
        family = GaugeMetricFamily("spine_node_deliveries_by_state", "Deliveries by state",
                                   labels=["state"])
        try:
            counts = self.queue.counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            counts = {}
        for state in ("pending", "delivered", "dead"):
            family.add_metric([state], counts.get(state, 0))
        yield family


_collector: DeliveriesCollector | None = None


def _register_collector(queue: DeliveryQueue) -> None:
    global _collector
    if _collector is not None:
        try:
            REGISTRY.unregister(_collector)
        except KeyError:
            pass
    _collector = DeliveriesCollector(queue)
    REGISTRY.register(_collector)


#: Deliveries sent per association: one job's SEG, SR and key image. Small on purpose: the
#: claim's lease covers the whole batch, and a node killed mid-send waits out that lease.
BATCH = 3

_running: "weakref.WeakSet[Exporter]" = weakref.WeakSet()


def wake() -> None:
    """Tell every exporter of this process that new deliveries may be due."""
    for exporter in list(_running):
        exporter.wake()


class Exporter:
    """Delivery threads for the configured destinations.

    ``settings``: :class:`config.Settings` (``exporter``, ``destinations``, ``node.ae_title``).
    """

    def __init__(self, settings, db: Database, store: BlobStore, *,
                 calling_ae: str | None = None):
        self.settings = settings
        self.queue = DeliveryQueue(db)
        self.claimer_id = new_worker_id("exporter")  # claimed_by of this exporter's leases
        self.index = Index(db)  # the audit trail
        self.store = store
        self.calling_ae = calling_ae or settings.node.ae_title
        self.backoff = Backoff.from_settings(settings.exporter)
        self.timeouts = Timeouts.from_settings(settings.exporter)
        self.poll_s = float(settings.exporter.poll_seconds)
        self.peers = {d.name: Peer.from_destination(d) for d in settings.destinations}
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.peers}
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Exporter":
        for name in self.peers:
            t = threading.Thread(target=self._loop, args=(name,), name=f"exporter-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        _running.add(self)
        _register_collector(self.queue)
        log.info("exporter started", extra={"destinations": ",".join(self.peers) or "-"})
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the threads; a send in progress ends within the SCU timeouts (daemon threads
        still sending after ``timeout_s`` leave their rows to the lease)."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        _running.discard(self)
        log.info("exporter stopped")

    def wake(self) -> None:
        for event in self._wake.values():
            event.set()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- one destination -------------------------------------------------------------------
    def _lease_s(self, n: int) -> float:
        t = self.timeouts
        return t.connect_s + t.acse_s + n * (t.dimse_s + t.network_s) + 30.0

    def _loop(self, name: str) -> None:
        wake = self._wake[name]
        while not self._stop.is_set():
            try:
                handled = self.deliver_due(name)
            except Exception:
                log.exception("exporter loop error", extra={"destination": name})
                handled = 0
            if handled:
                continue
            wait = self.poll_s
            try:
                due = self.queue.next_due_at(name)
            except Exception:  # noqa: BLE001
                due = None
            if due is not None:
                wait = max(0.05, min(wait, (due - utcnow()).total_seconds()))
            wake.wait(wait)
            wake.clear()

    def deliver_due(self, name: str) -> int:
        """Send what is due to destination ``name`` now (one association); returns how many
        deliveries were attempted."""
        peer = self.peers[name]
        claimed = self.queue.claim_due(name, limit=BATCH, lease_s=self._lease_s(BATCH),
                                       claimed_by=self.claimer_id)
        if not claimed:
            return 0
        if self._stop.is_set():
            self.queue.release(c.id for c in claimed)
            return 0
        sendable: list[tuple[ClaimedDelivery, str]] = []
        for c in claimed:
            try:
                path = self.store.path(c.path)
            except UnsafePathError as exc:
                self._failed(c, f"result path refused: {exc}")
                continue
            if not path.is_file():
                self._failed(c, f"result file {c.path} is missing from the store")
                continue
            sendable.append((c, str(path)))
        if not sendable:
            return len(claimed)
        try:
            outcomes = store_files([p for _, p in sendable], peer, calling_ae=self.calling_ae,
                                   timeouts=self.timeouts)
        except StoreError as exc:
            for c, _ in sendable:
                self._failed(c, str(exc))
            return len(claimed)
        except Exception as exc:
            log.exception("C-STORE failed", extra={"destination": name})
            for c, _ in sendable:
                self._failed(c, f"{type(exc).__name__}: {exc}")
            return len(claimed)
        for (c, _), outcome in zip(sendable, outcomes):
            if outcome.ok:
                self.queue.mark_delivered(c.id)
                DELIVERIES.labels(name, "delivered").inc()
                log.info("delivered", extra={"destination": name, "delivery_id": c.id,
                                             "kind": c.kind, "sop_uid": c.sop_instance_uid,
                                             "status": outcome.status})
                self._audit(c, "success")
            else:
                self._failed(c, outcome.error or "failed")
        return len(claimed)

    def _failed(self, c: ClaimedDelivery, error: str) -> None:
        result = self.queue.record_failure(c.id, error, self.backoff)
        outcome = "dead" if result.state.value == "dead" else "retry"
        DELIVERIES.labels(c.destination, outcome).inc()
        log.warning("delivery failed", extra={
            "destination": c.destination, "delivery_id": c.id, "kind": c.kind,
            "attempts": result.attempts, "state": result.state.value, "error": error,
            "next_attempt_at": result.next_attempt_at.isoformat() if result.next_attempt_at
            else None})
        if outcome == "dead":
            self._audit(c, "dead", reason=error)

    def _audit(self, c: ClaimedDelivery, outcome: str, reason: str | None = None) -> None:
        """ATNA "DICOM Instances Transferred" (the node sends): result delivered or dead."""
        peer = self.peers.get(c.destination)
        parts = (c.path or "").split("/")  # results/<study>/<series>/v<n>-job<id>/<name>
        audit.record(self.index, "result_delivered" if outcome == "success" else "result_dead",
                     outcome, actor=self.calling_ae,
                     study_instance_uid=parts[1] if len(parts) > 2 else None,
                     destination=c.destination, destination_ae=str(peer) if peer else None,
                     kind=c.kind, sop_instance_uid=c.sop_instance_uid, attempts=c.attempts + 1,
                     reason=reason)

