"""``spine-node serve`` (the whole node) and ``spine-node worker`` (job workers only, to scale
out on more machines sharing one PostgreSQL database and store)."""
from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

import typer

from dicom_node import metrics
from dicom_node.context import CONFIG_OPTION, NodeContext, settings_or_exit
from dicom_node.logging import get_logger, setup_logging

log = get_logger("spine_node.serve")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _recover(ctx: NodeContext) -> None:
    """After a crash: drop half-written temporaries, quarantine files no index row points at
    (storage.recovery), re-queue jobs left ``running``."""
    from storage.recovery import recover_store

    swept = recover_store(ctx.store, ctx.db)
    # Only jobs whose worker process (of this host) is gone: `spine-node worker` processes and
    # other nodes sharing the queue keep theirs. A worker that died on another machine is
    # found by the heartbeat (dicom_node.worker.Heartbeat, worker.lease_seconds).
    requeued, failed = ctx.queue.requeue_running(
        max_attempts=ctx.settings.worker.max_attempts, dead_local=True)
    released = _release_deliveries(ctx)
    if swept.temporaries_removed or swept.quarantined or requeued or failed or released:
        log.warning("recovered after an unclean stop",
                    extra={"temporaries_removed": swept.temporaries_removed,
                           "files_quarantined": swept.quarantined,
                           "quarantine": str(swept.folder) if swept.folder else None,
                           "jobs_requeued": requeued, "jobs_failed": failed,
                           "deliveries_released": released})
    if swept.left_recent:
        log.warning("unindexed files too recent to quarantine on a shared store, left for the "
                    "next start", extra={"files": swept.left_recent})


def _release_deliveries(ctx: NodeContext) -> int:
    """Deliveries claimed by this node's exporter when it died are due again now instead of
    after their lease. On SQLite this node's exporter is the only one: every pending delivery
    is due now, those waiting out a backoff included. On PostgreSQL other processes and
    machines may hold leases: only the claims of dead exporters of this host are released."""
    from storage.deliveries import DeliveryQueue

    queue = DeliveryQueue(ctx.db)
    return queue.due_now() if ctx.db.is_sqlite else queue.release_dead_local()


def _exporter(ctx: NodeContext):
    """The exporter that delivers results to the configured destinations."""
    from dicom_node.exporter import Exporter

    return Exporter(ctx.settings, ctx.db, ctx.store)


def _listeners(settings) -> list[tuple[str, int, str]]:
    """(host, port, setting) of every socket ``serve`` listens on (``settings``:
    :class:`config.Settings`)."""
    node = settings.node
    out = [(node.host, node.port, "node.port")]
    if node.tls.enabled and node.tls.port:
        out.append((node.host, node.tls.port, "node.tls.port"))
    if settings.http.enabled:
        out.append((settings.http.host, settings.http.port, "http.port"))
    return out


def _port_taken_exit(host: str, port: int, setting: str, exc: OSError) -> typer.Exit:
    """One line naming the address and the setting, then exit status 2 (as for a bad
    configuration value): a second ``serve`` on a busy port is a configuration problem."""
    why = exc.strerror or str(exc)
    print(f"spine-node: cannot listen on {host}:{port} ({setting}): {why}; stop the process "
          f"that holds it or choose another {setting}", file=sys.stderr)
    return typer.Exit(2)


def _check_ports(settings) -> None:
    """Exit (status 2) if a port ``serve`` needs is taken, before anything touches the store:
    the start-up recovery (removing temporaries, re-queueing jobs) must not run beside a node
    that already serves this store."""
    for host, port, setting in _listeners(settings):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _name, address = infos[0]
            with socket.socket(family, kind, proto) as sock:
                # as the listeners do: a port left in TIME_WAIT by a stopped node is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            raise _port_taken_exit(host, port, setting, exc) from None


def _make_worker(ctx: NodeContext, kind: str):
    from dicom_node.worker import Worker
    from storage.queue import new_worker_id
    return lambda: Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                          worker_id=new_worker_id(kind))


def serve(config: Path = CONFIG_OPTION) -> None:
    """Run the node: SCP, scheduler, workers, exporter, HTTP /health and /metrics, until
    SIGTERM (which drains cleanly)."""
    settings = settings_or_exit(config)
    setup_logging(settings.logging.level, settings.logging.json_format)
    _check_ports(settings)
    from dicom_node.http import HttpServer
    from dicom_node.scheduler import Scheduler
    from dicom_node.scp import StorageSCP
    from dicom_node.worker import drain_workers, start_worker_threads

    stop = _stop_on_signals()
    ctx = NodeContext.open(settings, upgrade=True)
    _recover(ctx)
    # Found out now rather than at the first C-STORE (a probe file): logged for the operator.
    log.info("storage", extra={"root": str(ctx.store.root), "direct_io": ctx.store.direct_io,
                               "fsync": ctx.store.fsync})
    metrics.register_jobs_collector(ctx.index)

    http = None
    scp = StorageSCP(settings, ctx.index, ctx.store)
    try:
        # Taken since _check_ports (another process was quicker): the same one line.
        if settings.http.enabled:
            try:
                http = HttpServer(settings.http.host, settings.http.port, ctx.db, ctx.store)
            except OSError as exc:
                raise _port_taken_exit(settings.http.host, settings.http.port, "http.port",
                                       exc) from None
            http.start()
        try:
            scp.start()
        except OSError as exc:
            tls = scp.server is not None  # the plain listener is up: the TLS one failed
            raise _port_taken_exit(settings.node.host,
                                   settings.node.tls.port if tls else settings.node.port,
                                   "node.tls.port" if tls else "node.port", exc) from None
    except typer.Exit:
        scp.drain(timeout_s=0)
        if http is not None:
            http.stop()
        ctx.close()
        raise
    pool = None
    if settings.node.acceptor_processes > 1:
        from dicom_node.acceptors import AcceptorPool
        pool = AcceptorPool(scp.server.socket, settings.node.acceptor_processes - 1, config)
        pool.start()
    scheduler = Scheduler(ctx.index, settings, ctx.store)
    scheduler.start()
    workers = start_worker_threads(_make_worker(ctx, "serve"), settings.worker.count)
    exporter = _exporter(ctx)
    exporter.start()
    from dicom_node import audit
    audit.record(ctx.index, "node_started", "success", actor=settings.node.ae_title,
                 port=scp.port, tls_port=scp.tls_port,
                 workers=settings.worker.count)
    log.info("node ready", extra={"ae_title": settings.node.ae_title, "port": scp.port})

    stop.wait()
    # Drain: no new associations (open ones finish), no new jobs, running jobs get
    # worker.drain_seconds and are otherwise re-queued for the next start.
    if pool is not None:
        pool.terminate()
    scp.drain(timeout_s=settings.node.dimse_timeout_s)
    if pool is not None:
        pool.wait(timeout_s=settings.node.dimse_timeout_s + 5)
    scheduler.stop()
    drain_workers(workers, ctx.queue, settings.worker.drain_seconds)
    exporter.stop()
    if http is not None:
        http.stop()
    audit.record(ctx.index, "node_stopped", "success", actor=settings.node.ae_title)
    ctx.close()
    log.info("node stopped")


def worker(config: Path = CONFIG_OPTION,
           count: int = typer.Option(None, "--count", "-n", min=1,
                                     help="worker threads (default: worker.count)")) -> None:
    """Run job workers only (no SCP, no scheduler), e.g. on a second machine."""
    settings = settings_or_exit(config)
    setup_logging(settings.logging.level, settings.logging.json_format)
    from dicom_node.worker import drain_workers, start_worker_threads

    stop = _stop_on_signals()
    ctx = NodeContext.open(settings, upgrade=True)
    ctx.queue.requeue_running(max_attempts=settings.worker.max_attempts, dead_local=True)
    workers = start_worker_threads(_make_worker(ctx, "worker"),
                                   count or max(1, settings.worker.count))
    stop.wait()
    drain_workers(workers, ctx.queue, settings.worker.drain_seconds)
    ctx.close()


def acceptor(config: Path = CONFIG_OPTION,
             listen_fd: int = typer.Option(..., "--listen-fd", help="inherited listening socket"),
             parent_pid: int = typer.Option(..., "--parent-pid", help="the serve process")) -> None:
    """An extra Storage SCP process of ``serve`` (node.acceptor_processes); not run by hand."""
    import os

    settings = settings_or_exit(config)
    setup_logging(settings.logging.level, settings.logging.json_format)
    from dicom_node.scp import StorageSCP

    stop = _stop_on_signals()
    ctx = NodeContext.open(settings, upgrade=False)
    scp = StorageSCP(settings, ctx.index, ctx.store)
    scp.start(listen_fd=listen_fd)
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # serve is gone (kill -9): stop accepting too
            log.warning("serve process gone, acceptor stopping", extra={"parent_pid": parent_pid})
            break
    scp.drain(timeout_s=settings.node.dimse_timeout_s)
    ctx.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("acceptor", hidden=True)(acceptor)
