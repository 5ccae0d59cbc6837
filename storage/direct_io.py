"""Putting buffers into a new file: ``writev`` of many buffers, and ``O_DIRECT`` through a
reused staging buffer (issue 8). :class:`storage.files.BlobStore` decides when each is used
(the setting ``storage.direct_io``, default on, and whether the file system takes it); this
module only writes.

Why direct I/O: the data is copied once into a reused, page-aligned staging buffer and goes
from there to the device, instead of being copied into newly allocated page-cache pages and
written back later. Touching fresh page-cache pages is what costs CPU on a virtual machine
(how much depends on the host: docs/archive/bench-history.md, "Sixth round"). The write returns
once the device has the data, so the later fdatasync only has the last partial block and the
file's metadata left to write. Nothing changes in what is durable when: that is
:mod:`storage.files` and :mod:`storage.ingest` (docs/durability.md).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterable, Sequence

#: Most buffers one writev() takes (POSIX IOV_MAX; Linux: 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024) or 1024

#: ``O_DIRECT`` where the system has it (Linux); 0 elsewhere, and then no direct I/O.
O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Alignment of a direct write's buffer, file offset and length: 4096 covers devices with
#: 512-byte and with 4096-byte logical blocks.
DIRECT_ALIGN = 4096
#: Size of a staging buffer (a multiple of ``DIRECT_ALIGN``): a CT slice (0.5 MB) goes to the
#: device in one write; larger files go through it a piece at a time.
DIRECT_CHUNK = 2 << 20


def write_all(fd: int, buffers: Sequence) -> None:
    """Write ``buffers`` one after the other with as few ``writev`` calls as the kernel takes
    (a received data set's fragments go to the file without being joined first)."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        if written <= 0:
            raise OSError(f"writev wrote {written} bytes")
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0


class StagingPool:
    """Page-aligned buffers (anonymous ``mmap``) for direct writes, reused: a buffer is taken
    for one file and given back, so a busy node keeps as many as it writes files at once and
    touches no new memory per file."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, DIRECT_CHUNK)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)


#: The process's staging buffers.
staging = StagingPool()


def write_blocks(fd: int, view: memoryview, size: int) -> None:
    """Write ``view[:size]``: whole blocks with ``O_DIRECT``, a last partial block through the
    page cache after ``O_DIRECT`` is cleared (the file keeps its exact length)."""
    whole = size - size % DIRECT_ALIGN
    if whole:
        write_all(fd, (view[:whole],))
    if size > whole:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
        write_all(fd, (view[whole:size],))


def write_direct(fd: int, buffers: Iterable) -> None:
    """Write ``buffers`` one after the other to ``fd``, a new file opened with ``O_DIRECT`` at
    offset 0: copied into an aligned staging buffer and written from there in whole blocks,
    straight to the device (no copy into the page cache), a piece at a time for files larger
    than the buffer; a last partial block goes through the page cache (:func:`write_blocks`)."""
    buf = staging.take()
    view = memoryview(buf)
    try:
        fill = 0
        for chunk in buffers:
            data = memoryview(chunk).cast("B")
            pos, size = 0, len(data)
            while pos < size:
                n = min(size - pos, DIRECT_CHUNK - fill)
                view[fill:fill + n] = data[pos:pos + n]
                fill += n
                pos += n
                if fill == DIRECT_CHUNK:
                    write_all(fd, (view,))
                    fill = 0
        write_blocks(fd, view, fill)
    finally:
        view.release()
        staging.give(buf)
