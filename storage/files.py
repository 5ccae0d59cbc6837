"""The storage area: a blob store that writes atomically under paths built from validated UIDs.

Orthanc's split (STYLE.md): :mod:`storage.index` knows what exists, this module holds the bytes.
A write goes to a temporary file in the destination directory, is fsynced, renamed into place
and the directory fsynced, so a crash (even ``kill -9`` or power loss) leaves either the whole
file or nothing under its final name. The one exception, :meth:`BlobStore.write_new`, writes a
received instance under a final name that nothing points at yet (issue 8: no rename, a cheaper
directory fsync); there a crash may leave a partial file, which no index row names and the next
copy of the instance replaces (:mod:`storage.ingest`). Its data sync may be deferred
(:class:`PendingSync`): the write-back starts at once and the caller makes it durable later,
after other work, but before anything points at the file. Only
:func:`storage.uids.validate_uid` output and our own fixed names ever become path components,
so no path from a dataset reaches the file system.

Files are written with ``O_DIRECT`` where the file system takes it (the setting
``storage.direct_io``, default on; the writing itself is :mod:`storage.direct_io`). What is
durable when, and which code keeps each promise: docs/durability.md.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import direct_io as dio
from storage.uids import validate_uid

TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class OutOfSpaceError(OSError):
    """Free disk space would fall below the configured floor (answer 0xA700)."""


class UnsafePathError(ValueError):
    """A path component that is not a validated UID or a plain file name."""


def _safe_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise UnsafePathError(f"{name!r} is not a safe file name")
    return name


#: fdatasync where there is one: the data and the size, not the timestamps.
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _chunks(data: bytes | Iterable) -> tuple[Iterable, int]:
    """``data`` (bytes, or buffers written one after the other) as buffers, and its size (0
    when an iterator's size is not known in advance)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (data,), len(data)
    if isinstance(data, (list, tuple)):
        return data, sum(len(c) for c in data)
    return data, 0


#: ``SYNC_FILE_RANGE_WRITE`` of sync_file_range(2): start writing dirty pages back, no waiting.
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    """Linux's ``sync_file_range`` from the C library (Python's ``os`` has none), or ``None``
    where there is none (other systems: the later fdatasync then does all the work)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to the device without waiting for them (a hint: it
    makes no promise of durability, only that a later fdatasync has less left to wait for)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors: fdatasync reports them


class PendingSync:
    """An open file whose data has been written and whose write-back has started, but which is
    not yet durable. :meth:`sync` fdatasyncs and closes it: once, whoever calls it first;
    concurrent and later callers wait for that call and get its outcome (so an association
    thread and the group commit's leader may both call it). :meth:`close` closes it without a
    sync (error paths)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self.synced = False

    def sync(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    _fdatasync(self._fd)
                    self.synced = True
                except BaseException as exc:  # noqa: BLE001 - kept for every caller
                    self._error = exc
                finally:
                    self._closed = True
                    os.close(self._fd)
        if self._error is not None:
            raise self._error
        if not self.synced:
            raise OSError("the file was closed before its data was synced")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


@dataclass
class NewFile:
    """A file :meth:`BlobStore.write_new` created under its final name."""

    path: Path
    inode: int
    #: Set when the data sync was deferred: call ``pending.sync()`` before anything may
    #: point at the file (and ``pending.close()`` on every way out).
    pending: PendingSync | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files of one node under ``root``: ``instances/<study>/<series>/<sop>.dcm`` and
    ``results/<study>/<series>/v<version>-job<id>/<name>``."""

    def __init__(self, root: str | os.PathLike[str], *, min_free_mb: int = 0,
                 fsync: bool = True, direct_io: bool = True):
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_mb) * 1024 * 1024
        self.fsync = fsync
        #: Write files with O_DIRECT (:func:`storage.direct_io.write_direct`); ``None`` until a
        #: first write found out whether the file system takes it.
        self._direct: bool | None = None if (direct_io and dio.O_DIRECT) else False
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------------
    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        parts = (validate_uid(study_uid, "Study Instance UID"),
                 validate_uid(series_uid, "Series Instance UID"),
                 validate_uid(sop_uid, "SOP Instance UID"))
        return f"instances/{parts[0]}/{parts[1]}/{parts[2]}.dcm"

    def result_relpath(self, study_uid: str, series_uid: str, version: int, job_id: int,
                       name: str) -> str:
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_uid, "Series Instance UID")
        return f"results/{study}/{series}/v{int(version)}-job{int(job_id)}/{_safe_name(name)}"

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored relative path; refuses anything that leaves the root."""
        rel = Path(relpath)
        if rel.is_absolute() or any(p in ("..", "") for p in rel.parts):
            raise UnsafePathError(f"{relpath!r} is not a path inside the store")
        for part in rel.parts:
            if part.startswith(TMP_PREFIX):
                raise UnsafePathError(f"{relpath!r} names a temporary file")
        return self.root / rel

    # -- space ---------------------------------------------------------------------------
    def free_bytes(self) -> int:
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def check_space(self, incoming: int = 0) -> None:
        if self.min_free_bytes and self.free_bytes() - incoming < self.min_free_bytes:
            raise OutOfSpaceError(
                f"free disk below storage.min_free_mb = {self.min_free_bytes // 2**20}")

    # -- writing -------------------------------------------------------------------------
    @property
    def direct_io(self) -> bool:
        """Whether new files are written with ``O_DIRECT``: asked for (``storage.direct_io``)
        and taken by the file system under the root (tried once, with a probe file: tmpfs and
        some network file systems refuse it, and then the page cache is used)."""
        if self._direct is None:
            with self._lock:
                if self._direct is None:
                    self._direct = self._probe_direct()
        return self._direct

    def _probe_direct(self) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f"{TMP_PREFIX}direct-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | dio.O_DIRECT, 0o640)
            try:
                dio.write_direct(fd, (bytes(dio.DIRECT_ALIGN + 1),))
            finally:
                os.close(fd)
            return True
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _create(self, path: Path) -> int:
        """Open a new file (``O_EXCL``), with ``O_DIRECT`` when :attr:`direct_io`."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (dio.O_DIRECT if self.direct_io else 0)
        return os.open(path, flags, 0o640)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # New directory entries must be durable too, from the parent that existed down.
            for new in reversed(missing):
                _fsync_dir(new.parent)
        with self._lock:
            self._known_dirs.add(directory)

    def write_atomic(self, relpath: str, data: bytes | Iterable[bytes], *,
                     sync_dir: bool = True) -> Path:
        """Write ``data`` to ``relpath`` atomically; returns the final path.

        On any error nothing is left under the final name and the temporary file is removed.
        ``sync_dir=False`` leaves the directory fsync (which makes the rename durable) to the
        caller, who may group it with others (:meth:`sync_dirs`); the data is synced before
        the rename either way, so the final name never shows a partial file.
        """
        tmp = self.write_temp(relpath, data)
        try:
            final = self.place(tmp, relpath)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync and sync_dir:
            _fsync_dir(final.parent)
        return final

    def write_temp(self, relpath: str, data: bytes | Iterable[bytes]) -> Path:
        """Write ``data`` (bytes, or a sequence of buffers written one after the other) to a
        new temporary file in ``relpath``'s directory, fdatasynced; :meth:`place` names it.

        On any error the temporary file is removed. Raises :class:`OutOfSpaceError` below
        the free-space floor.
        """
        final = self.path(relpath)
        chunks, size = _chunks(data)
        self.check_space(size)
        self._ensure_dir(final.parent)
        tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = self._create(tmp)
        self._fill(fd, tmp, chunks, direct=self.direct_io)
        return tmp

    def _fill(self, fd: int, path: Path, chunks: Iterable, *, direct: bool,
              defer_sync: bool = False) -> PendingSync | None:
        """Write ``chunks`` to the new file ``fd`` (at ``path``; opened with ``O_DIRECT`` if
        ``direct``), fdatasync it (unless ``fsync`` is off) and close it; on any error the
        file is removed.

        ``defer_sync`` (with ``fsync`` on): start the write-back instead and return the still
        open file as a :class:`PendingSync`; the caller syncs it later.
        """
        try:
            try:
                if direct:
                    dio.write_direct(fd, chunks)
                elif isinstance(chunks, (list, tuple)):
                    dio.write_all(fd, chunks)
                else:
                    for chunk in chunks:
                        dio.write_all(fd, (chunk,))
                if self.fsync and defer_sync:
                    if not direct:  # written directly, the data is on the device already
                        start_writeback(fd)
                    pending, fd = PendingSync(fd), -1
                    return pending
                if self.fsync:
                    _fdatasync(fd)
            finally:
                if fd >= 0:
                    os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return None

    def write_new(self, relpath: str, data: bytes | Sequence, *,
                  defer_sync: bool = False) -> NewFile | None:
        """Write ``data`` directly under ``relpath`` if nothing is there yet (``O_EXCL``),
        fdatasynced; returns the path and the file's inode number, or ``None`` when a file is
        already there (the caller then writes a temporary file and renames it, replacing it).

        ``defer_sync=True``: the data's write-back is started but not waited for; the returned
        :attr:`NewFile.pending` makes it durable (:mod:`storage.ingest` does so after the index
        insert, before the commit, so the insert's CPU time overlaps the device's work).

        No rename, so the directory only changes when the file is created: its fsync, which
        makes the name durable, costs a device flush and little else (and may run while the
        data is still being written back). Unlike :meth:`write_atomic`, a crash during the
        write can leave a partial file under the final name; the instance store only does
        this for names no index row points at yet (:mod:`storage.ingest`), and the next copy
        replaces it. On any error the file is removed. Raises :class:`OutOfSpaceError` below
        the floor.
        """
        final = self.path(relpath)
        chunks, size = _chunks(data)
        self.check_space(size)
        self._ensure_dir(final.parent)
        try:
            fd = self._create(final)
        except FileExistsError:
            return None
        try:
            inode = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        pending = self._fill(fd, final, chunks, direct=self.direct_io, defer_sync=defer_sync)
        return NewFile(final, inode, pending)

    def remove_if_same(self, path: Path, inode: int) -> None:
        """Delete ``path`` if it is still the file with ``inode`` (not one renamed over it)."""
        try:
            if os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass

    def place(self, tmp: Path, relpath: str) -> Path:
        """Rename a file of :meth:`write_temp` to ``relpath`` (replacing what is there);
        returns the final path. The directory is not synced (:meth:`sync_dirs`).

        Placing again a temporary file that an earlier, failed attempt already renamed is a
        no-op: temporary names are unique, so the final file holds its data.
        """
        final = self.path(relpath)
        self._ensure_dir(final.parent)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            if tmp.exists() or not final.is_file():
                raise
        return final

    def sync_dirs(self, paths: Iterable[Path]) -> None:
        """fsync the directories of ``paths`` (files renamed with ``sync_dir=False``), each
        directory once however many of its files are given."""
        if not self.fsync:
            return
        for directory in {Path(p).parent for p in paths}:
            _fsync_dir(directory)

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def delete(self, relpath: str) -> None:
        try:
            self.path(relpath).unlink()
        except FileNotFoundError:
            pass

    def remove_temporaries(self) -> int:
        """Delete temporary files a crash left behind (called on start); returns how many."""
        removed = 0
        for sub in ("instances", "results"):
            base = self.root / sub
            if not base.exists():
                continue
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(TMP_PREFIX):
                        try:
                            os.unlink(os.path.join(dirpath, name))
                            removed += 1
                        except FileNotFoundError:
                            pass
        return removed

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created, synced and removed under the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f"{TMP_PREFIX}health-{uuid.uuid4().hex}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
