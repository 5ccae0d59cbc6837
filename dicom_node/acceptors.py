"""The Storage SCP's listener, and extra acceptor processes on its listening socket (issue 8,
``node.acceptor_processes``).

pynetdicom runs every association as a thread of one process, so concurrent senders share one
GIL: with four storescu the node used 6.2 ms of CPU per instance against 4.7 ms with one, and
stayed at 0.55-0.60x Orthanc's throughput, which spreads them over both cores
(docs/archive/bench-history.md).
The pre-fork model of web servers fixes that without touching pynetdicom: ``serve`` binds the
port as before, then starts ``node.acceptor_processes - 1`` child processes (``spine-node
acceptor``, not meant to be run by hand) that inherit the *same* listening socket and accept
from it too; the kernel hands each new connection to one of them. Each child is a complete
Storage SCP (same settings, store and database: SQLite's locking or PostgreSQL's serialise
their index writes) without scheduler, workers, exporter or HTTP.

No ``SO_REUSEPORT``: a second node started on the same port by mistake still fails to bind
instead of silently taking half of the traffic. The listening socket is non-blocking in every
process, so a process that loses the race for a connection returns to waiting at once.

Children stop when ``serve`` stops (SIGTERM: they drain like the parent), and on their own when
the parent is gone (``kill -9``): they check every second. A child that dies is started again.
Limits such as ``node.max_associations`` hold per process; /metrics shows the main process.

:class:`StorageServer` is the storage SCP's listener in every process: pynetdicom's threaded
server, subclassed to accept on the inherited socket, to defer ``accept`` while busy, and to
create its associations with the request handler of ``node.fast_path``
(:mod:`dicom_node.fastpath.hooks`).
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.fastpath.hooks import FastRequestHandler, request_handler
from dicom_node.logging import get_logger

log = get_logger("spine_node.acceptors")

#: Shortest time between two starts of the same child (a child that cannot start must not spin).
RESTART_DELAY_S = 5.0


#: Delay of a process's ``accept`` per association it already serves, at most ``_DEFER_MAX_S``.
_DEFER_PER_ASSOCIATION_S = 0.002
_DEFER_MAX_S = 0.01


class StorageServer(ThreadedAssociationServer):
    """The storage SCP's listener: pynetdicom's threaded ``AssociationServer`` with

    - ``request_handler``: the class that creates each association (pynetdicom's parameter):
      :func:`dicom_node.fastpath.hooks.request_handler` gives the fast path's or the stock one;
    - ``listen_fd``: accept on that listening socket (inherited from ``serve``) instead of
      binding ``address``;
    - ``defer_when_busy``: wait a moment before each ``accept`` while serving associations
      (the listening socket is shared by the acceptor processes: the kernel wakes every
      process for a new connection and the first to accept gets it, so without this the
      busiest process, often the quickest to wake, takes most senders; an idle process
      accepts at once, a single sender is never delayed).
    """

    def __init__(self, ae: AE, address: tuple, ae_title: str, contexts: list,
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list | None = None,
                 *, request_handler: type[RequestHandler] = RequestHandler,
                 listen_fd: int | None = None, defer_when_busy: bool = False) -> None:
        self._listen_fd = listen_fd  # read by server_bind, during super().__init__
        self._defer_when_busy = defer_when_busy
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=request_handler)

    @property
    def fast_path(self) -> bool:
        """Whether its associations are the fast path's (:mod:`dicom_node.fastpath.hooks`)."""
        return issubclass(self.RequestHandlerClass, FastRequestHandler)

    def server_bind(self) -> None:
        if self._listen_fd is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = socket.socket(fileno=self._listen_fd)
        # Non-blocking in every process: one that loses the race for a connection returns
        # to waiting at once (BlockingIOError, which socketserver ignores).
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listen_fd is None:  # an inherited socket is listening already
            super().server_activate()

    def get_request(self):
        if self._defer_when_busy:
            busy = sum(1 for a in self.ae.active_associations if a.is_established)
            if busy:
                time.sleep(min(_DEFER_MAX_S, busy * _DEFER_PER_ASSOCIATION_S))
        return super().get_request()


def start_server(ae: AE, address: tuple, *, evt_handlers: list,
                 ssl_context: ssl.SSLContext | None = None, fast_path: bool = True,
                 listen_fd: int | None = None, defer_when_busy: bool = False) -> StorageServer:
    """``ae.start_server(address, block=False, ...)`` with a :class:`StorageServer`: the same
    checks of the AE's contexts (``AE.make_server``), then ``serve_forever`` in a daemon
    thread; ``server.shutdown()`` stops it. ``fast_path``: its associations are those of
    :mod:`dicom_node.fastpath.hooks` (when the installed pynetdicom is a tested version)."""
    server_class = functools.partial(StorageServer, request_handler=request_handler(fast_path),
                                     listen_fd=listen_fd, defer_when_busy=defer_when_busy)
    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context,
                            server_class=server_class)
    thread = threading.Thread(target=make_target(server.serve_forever), daemon=True,
                              name=f"AcceptorServer@{server.server_address[1]}")
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
    return server


class AcceptorPool:
    """``count`` child processes accepting on ``listener`` (see the module docstring)."""

    def __init__(self, listener: socket.socket, count: int, config: Path | None):
        self.listener = listener
        self.count = count
        self.config = config
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._started: list[float] = [0.0] * count
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "dicom_node", "acceptor",
               "--listen-fd", str(self.listener.fileno()), "--parent-pid", str(os.getpid())]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd

    def _spawn(self, i: int) -> None:
        self._started[i] = time.monotonic()
        self._procs[i] = subprocess.Popen(self._command(), pass_fds=(self.listener.fileno(),))
        log.info("acceptor process started", extra={"acceptor": i + 1, "pid": self._procs[i].pid})

    def start(self) -> None:
        # The parent accepts from the same socket: it must not block when a child wins the race.
        self.listener.setblocking(False)
        for i in range(self.count):
            self._spawn(i)
        self._monitor = threading.Thread(target=self._watch, name="acceptor-pool", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                if time.monotonic() - self._started[i] < RESTART_DELAY_S:
                    continue
                log.error("acceptor process exited, starting it again",
                          extra={"acceptor": i + 1, "pid": proc.pid, "status": proc.returncode})
                self._spawn(i)

    def terminate(self) -> None:
        """SIGTERM every child: each stops accepting and drains its associations."""
        self._stop.set()
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 35.0) -> None:
        """Wait for the children after :meth:`terminate`; SIGKILL what is left at the end."""
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("acceptor process did not stop, killing it", extra={"pid": proc.pid})
                proc.kill()
                proc.wait()
