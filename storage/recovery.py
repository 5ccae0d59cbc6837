"""Start-up recovery of the storage area: what a crash can leave in the store is put away
before the node accepts anything (docs/durability.md, "No partial file survives a restart").

A crash (``kill -9``, power loss) during a C-STORE can leave:

- a temporary file (``.tmp-*``) that was never renamed into place: deleted
  (:meth:`storage.files.BlobStore.remove_temporaries`);
- a file under its final name with no index row: a new instance is written directly under its
  final name (:meth:`storage.files.BlobStore.write_new`) and its row committed after the data
  is durable, so a crash in between leaves a file, complete or partial, that no row names.
  After a power loss with ``storage.sqlite_synchronous = NORMAL`` a complete, acknowledged
  file can also lose its row. Such files are moved, not deleted, to
  ``<store>/quarantine/<UTC time>/`` under their relative path: a partial one is of no use, a
  complete one can be sent to the node again from there.

Never moved: a file an index row points at (``instances.path``), and a file in the folder of a
job that exists (``results/<study>/<series>/v<version>-job<id>/``: its results may be written
before their rows). Files under ``results/`` outside that layout are not the node's and are
left alone.

A shared store (PostgreSQL: other ``serve`` processes may be receiving into the same store)
holds, for a moment, files that another node has written and not yet indexed. There only files
unchanged for :data:`SHARED_STORE_GRACE_S` are moved; younger ones are counted and left for the
next start. With SQLite the node starting is the only one writing instances, and every
unindexed file is moved.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from storage.db import Database
from storage.files import TMP_PREFIX, BlobStore
from storage.models import Instance, Job, Result
from storage.uids import is_valid_uid

#: The folder under the store's root that unindexed files are moved to.
QUARANTINE_DIR = "quarantine"
#: With a database other than SQLite, an unindexed file younger than this (seconds since its
#: last change) may be one that another node is about to index: left alone.
SHARED_STORE_GRACE_S = 600.0
#: Files looked up in the index per query.
_BATCH = 500
_JOB_DIR = re.compile(r"v[0-9]+-job([0-9]+)")


@dataclass(frozen=True)
class StoreRecovery:
    """What :func:`recover_store` did (counts only: no UIDs, nothing about patients)."""

    temporaries_removed: int = 0
    #: Files no row points at, moved to :attr:`folder`.
    quarantined: int = 0
    quarantined_bytes: int = 0
    #: Unindexed files left because they changed within the grace period (shared store).
    left_recent: int = 0
    folder: Path | None = None


def recover_store(store: BlobStore, db: Database, *, grace_s: float | None = None,
                  now: float | None = None) -> StoreRecovery:
    """Delete temporaries, then move every file of the store that no index row points at (and
    that belongs to no job) to ``<store>/quarantine/<UTC time>/``. Run before the node
    accepts associations (``spine-node serve``). ``grace_s``: leave unindexed files changed
    less than this long ago (default: 0 with SQLite, :data:`SHARED_STORE_GRACE_S` otherwise).
    """
    removed = store.remove_temporaries()
    if grace_s is None:
        grace_s = 0.0 if db.is_sqlite else SHARED_STORE_GRACE_S
    now = time.time() if now is None else now
    mover = _Mover(store.root, grace_s, now)
    for batch in _batches(_files(store.root, "instances")):
        for rel, path in _unindexed_instances(db, batch):
            mover.move(rel, path)
    for batch in _batches(_files(store.root, "results")):
        for rel, path in _orphan_results(db, batch):
            mover.move(rel, path)
    return StoreRecovery(temporaries_removed=removed, quarantined=mover.moved,
                         quarantined_bytes=mover.bytes, left_recent=mover.left_recent,
                         folder=mover.folder)


def _files(root: Path, sub: str) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every regular file under ``root/sub``, temporaries aside."""
    base = root / sub
    if not base.is_dir():
        return
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            if name.startswith(TMP_PREFIX):
                continue   # another node's write in progress (shared store): not ours
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).as_posix(), path


def _batches(items: Iterator[tuple[str, Path]]) -> Iterator[list[tuple[str, Path]]]:
    batch: list[tuple[str, Path]] = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _unindexed_instances(db: Database, batch: list[tuple[str, Path]],
                         ) -> list[tuple[str, Path]]:
    """The files of ``batch`` (under ``instances/``) that no instance row points at. A file is
    named ``<SOP Instance UID>.dcm``: looked up by that UID (unique index); a name of another
    form is looked up by path."""
    by_uid: dict[str, str] = {}
    odd: list[str] = []
    for rel, path in batch:
        uid = path.name[:-4] if path.name.endswith(".dcm") else ""
        if is_valid_uid(uid):
            by_uid[uid] = rel
        else:
            odd.append(rel)
    indexed: set[str] = set()
    with db.engine.connect() as conn:
        if by_uid:
            indexed.update(conn.scalars(select(Instance.path).where(
                Instance.sop_instance_uid.in_(list(by_uid)))))
        if odd:
            indexed.update(conn.scalars(select(Instance.path).where(Instance.path.in_(odd))))
    return [(rel, path) for rel, path in batch if rel not in indexed]


def _orphan_results(db: Database, batch: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The files of ``batch`` (under ``results/``) in a job folder whose job does not exist and
    that no result row points at; files outside the layout are not the node's: kept."""
    job_of: dict[str, int] = {}
    for rel, _path in batch:
        parts = rel.split("/")
        match = _JOB_DIR.fullmatch(parts[-2]) if len(parts) == 5 else None
        if match:
            job_of[rel] = int(match.group(1))
    if not job_of:
        return []
    with db.engine.connect() as conn:
        jobs = set(conn.scalars(select(Job.id).where(Job.id.in_(set(job_of.values())))))
        candidates = [rel for rel, job in job_of.items() if job not in jobs]
        named = set(conn.scalars(select(Result.path).where(Result.path.in_(candidates)))) \
            if candidates else set()
    return [(rel, path) for rel, path in batch
            if rel in job_of and job_of[rel] not in jobs and rel not in named]


class _Mover:
    """Moves files into one quarantine folder, made on the first move."""

    def __init__(self, root: Path, grace_s: float, now: float):
        self.root = root
        self.grace_s = grace_s
        self.now = now
        self.folder: Path | None = None
        self.moved = self.bytes = self.left_recent = 0

    def move(self, rel: str, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        if self.grace_s and self.now - st.st_mtime < self.grace_s:
            self.left_recent += 1
            return
        target = self._folder() / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # A rename within the store's file system. Not synced: if a power loss undoes it,
            # the next start moves the file again. Emptied directories stay: a writer of a
            # shared store may hold them as known (storage.files.BlobStore._ensure_dir).
            os.rename(path, target)
        except FileNotFoundError:
            return
        self.moved += 1
        self.bytes += st.st_size

    def _folder(self) -> Path:
        if self.folder is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now))
            base = self.root / QUARANTINE_DIR
            base.mkdir(parents=True, exist_ok=True)
            for k in range(1000):
                folder = base / (stamp if k == 0 else f"{stamp}-{k}")
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                self.folder = folder
                break
            else:
                raise FileExistsError(f"no free quarantine folder under {base}")
        return self.folder
