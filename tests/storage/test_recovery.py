"""What a crash leaves in the store, and the start-up recovery that puts it away
(storage.recovery; docs/durability.md). Real files, a real SQLite index; the crashes are real
``kill -9`` of a process that stores instances, at chosen points of the write path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.db import Database
from storage.files import TMP_PREFIX, BlobStore
from storage.index import Index, InstanceRecord
from storage.ingest import InstanceWriter, Outcome
from storage.recovery import QUARANTINE_DIR, SHARED_STORE_GRACE_S, recover_store
from tests.helpers import REPO

STUDY, SERIES = "1.2.3", "1.2.3.1"
#: A payload of several blocks and a partial one (direct I/O writes whole blocks first).
SIZE = 3 * 4096 + 100


def _record(store: BlobStore, k: int, series: str = SERIES) -> InstanceRecord:
    sop = f"{series}.{k}"
    return InstanceRecord(study_instance_uid=STUDY, series_instance_uid=series,
                          sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                          path=store.instance_relpath(STUDY, series, sop), size_bytes=SIZE,
                          instance_number=k)


def _payload(k: int) -> bytes:
    return bytes([k % 251 + 1]) * SIZE


def _files(root: Path, sub: str = "instances") -> set[str]:
    base = root / sub
    return {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()} \
        if base.exists() else set()


def _rows(db: Database) -> dict[str, str]:
    """SOP Instance UID -> path of every committed instance row."""
    with db.engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT sop_instance_uid, path FROM instances").all())


@pytest.fixture
def node(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/index.db")
    db.upgrade()
    store = BlobStore(tmp_path / "store")
    yield db, Index(db), store
    db.dispose()


def test_start_up_quarantines_unindexed_files_and_leaves_indexed_ones(node):
    db, index, store = node
    writer = InstanceWriter(store, index)
    for k in range(3):
        assert writer.store_instance(_record(store, k), _payload(k)) is Outcome.STORED
    indexed = {rel: (store.path(rel).stat().st_ino, store.path(rel).read_bytes())
               for rel in _files(store.root)}
    # What a crash can leave: a file written under its final name and never indexed (partial
    # or complete), a temporary file, a file of another name; and the results of a job that
    # exists (kept: written before their rows) and of one that does not.
    orphan = store.path(store.instance_relpath(STUDY, SERIES, f"{SERIES}.9"))
    orphan.write_bytes(b"DI")
    other_series = store.path(store.instance_relpath(STUDY, "1.2.3.2", "1.2.3.2.1"))
    other_series.parent.mkdir(parents=True)
    other_series.write_bytes(_payload(7))
    odd = orphan.parent / "notes.txt"
    odd.write_bytes(b"?")
    tmp = orphan.parent / f"{TMP_PREFIX}deadbeef"
    tmp.write_bytes(b"half")
    series = index.stable_series(received_before=_far_future())[0]
    job = index.schedule_series(series, skip_reason=None)
    kept_result = store.write_atomic(
        store.result_relpath(STUDY, SERIES, job.version, job.id, "summary.json"), b"{}")
    gone_job = store.write_atomic(
        store.result_relpath(STUDY, SERIES, 1, job.id + 41, "seg.dcm"), b"SEG")
    not_ours = store.root / "results" / "README"
    not_ours.write_bytes(b"left alone")

    swept = recover_store(store, db)

    assert swept.temporaries_removed == 1 and not tmp.exists()
    assert swept.quarantined == 4 and swept.quarantined_bytes == 2 + SIZE + 1 + 3
    assert swept.folder is not None and swept.folder.parent == store.root / QUARANTINE_DIR
    moved = {p.relative_to(swept.folder).as_posix(): p.read_bytes()
             for p in swept.folder.rglob("*") if p.is_file()}
    assert moved == {
        f"instances/{STUDY}/{SERIES}/{SERIES}.9.dcm": b"DI",
        f"instances/{STUDY}/1.2.3.2/1.2.3.2.1.dcm": _payload(7),
        f"instances/{STUDY}/{SERIES}/notes.txt": b"?",
        f"results/{STUDY}/{SERIES}/v1-job{job.id + 41}/seg.dcm": b"SEG"}
    assert not gone_job.exists()
    # Indexed files: the same files (inode), the same bytes; and nothing else is left.
    assert _files(store.root) == set(indexed) == set(_rows(db).values())
    assert {rel: (store.path(rel).stat().st_ino, store.path(rel).read_bytes())
            for rel in indexed} == indexed
    assert kept_result.read_bytes() == b"{}" and not_ours.read_bytes() == b"left alone"
    # Idempotent: a second start finds nothing.
    again = recover_store(store, db)
    assert (again.quarantined, again.temporaries_removed, again.folder) == (0, 0, None)


def test_a_shared_store_leaves_files_another_node_may_be_indexing(node):
    """An unindexed file on a store other nodes may write into is moved only once it has not
    changed for the grace period (it may be one that another node is about to index)."""
    db, _index, store = node
    orphan = store.path(store.instance_relpath(STUDY, SERIES, f"{SERIES}.1"))
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"DICM")
    swept = recover_store(store, db, grace_s=SHARED_STORE_GRACE_S)
    assert (swept.quarantined, swept.left_recent) == (0, 1) and orphan.exists()
    later = time.time() + SHARED_STORE_GRACE_S + 1
    swept = recover_store(store, db, grace_s=SHARED_STORE_GRACE_S, now=later)
    assert (swept.quarantined, swept.left_recent) == (1, 0) and not orphan.exists()


@pytest.mark.integration
def test_on_postgresql_the_grace_applies_by_default_and_indexed_files_stay(postgres_url,
                                                                           tmp_path):
    from tests.helpers import create_pg_database
    db = Database(create_pg_database(postgres_url, "recovery"))
    db.upgrade()
    try:
        store = BlobStore(tmp_path / "store")
        writer = InstanceWriter(store, Index(db))
        for k in range(2):
            writer.store_instance(_record(store, k), _payload(k))
        orphan = store.path(store.instance_relpath(STUDY, SERIES, f"{SERIES}.9"))
        orphan.write_bytes(b"DI")
        swept = recover_store(store, db)
        assert (swept.quarantined, swept.left_recent) == (0, 1) and orphan.exists()
        swept = recover_store(store, db, now=time.time() + SHARED_STORE_GRACE_S + 1)
        assert swept.quarantined == 1 and not orphan.exists()
        assert _files(store.root) == set(_rows(db).values()) and len(_rows(db)) == 2
    finally:
        db.dispose()


def _far_future():
    import datetime as dt
    return dt.datetime(2999, 1, 1)


# -- kill -9 while storing ---------------------------------------------------------------------
#: A process that stores instances 0..3 of one series through storage.ingest exactly as the SCP
#: does, and kills itself (SIGKILL) when storing instance 2 reaches ``point``.
_CHILD = r"""
import json, os, signal, sys
import storage.files as files
from storage.db import Database
from storage.files import BlobStore
from storage.index import Index
from storage.ingest import InstanceWriter
from tests.storage.test_recovery import _payload, _record

args = json.loads(sys.argv[1])
db = Database(args["url"])
store = BlobStore(args["root"])
writer = InstanceWriter(store, Index(db))
target = str(store.path(_record(store, 2).path))
armed = False

def hits(fd, *, temporary=False, directory=False):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if directory:
        return armed and name == os.path.dirname(target)
    if temporary:
        return (armed and os.path.dirname(name) == os.path.dirname(target)
                and os.path.basename(name).startswith(files.TMP_PREFIX))
    return armed and name == target

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = args["point"]
if point in ("new file half written", "temporary file half written"):
    real_writev = os.writev
    def writev(fd, buffers):
        if hits(fd, temporary=point.startswith("temporary")):
            real_writev(fd, [memoryview(buffers[0]).cast("B")[:4096]])
            die()
        return real_writev(fd, buffers)
    os.writev = writev
elif point == "new file written, its data sync inside the transaction":
    real_sync = files._fdatasync
    def sync(fd):
        if hits(fd):
            die()
        return real_sync(fd)
    files._fdatasync = sync
elif point == "temporary file renamed into place, directory sync before the commit":
    real_dir = files._fsync_dir
    def fsync_dir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            if hits(fd, directory=True):
                die()
        finally:
            os.close(fd)
        return real_dir(path)
    files._fsync_dir = fsync_dir
for k in range(4):
    armed = k == 2
    writer.store_instance(_record(store, k), _payload(k))
"""

POINTS = ["new file half written",
          "new file written, its data sync inside the transaction",
          "temporary file half written",
          "temporary file renamed into place, directory sync before the commit"]


@pytest.mark.parametrize("point", POINTS)
def test_kill9_while_storing_commits_no_row_for_an_incomplete_file_and_start_up_clears_it(
        node, tmp_path, point):
    """(b) no committed row points at an incomplete file, (c) no partial file survives a
    restart: the process storing instance 2 is killed at ``point``; every committed row then
    names a complete file, instance 2 has no row, the recovery leaves only indexed files, and
    the sender's next copy is stored whole."""
    db, _index, store = node
    target = _record(store, 2)
    if point.startswith("temporary"):
        # Its final name is taken by a partial file of an earlier crash: the next copy goes
        # through a temporary file, renamed onto it.
        final = store.path(target.path)
        final.parent.mkdir(parents=True)
        final.write_bytes(b"DI")
    child = subprocess.run(
        [sys.executable, "-c", _CHILD,
         json.dumps({"url": str(db.url), "root": str(store.root), "point": point})],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    rows = _rows(db)
    assert sorted(rows) == [f"{SERIES}.0", f"{SERIES}.1"], rows   # 2 never committed
    for sop, rel in rows.items():                                 # (b)
        assert store.read_bytes(rel) == _payload(int(sop.rsplit(".", 1)[1])), rel
    left = _files(store.root)
    assert store.path(target.path).exists() or any(TMP_PREFIX in p for p in left)

    swept = recover_store(store, db)                              # the restart
    assert _files(store.root) == set(rows.values())               # (c)
    assert swept.quarantined == 1
    [kept] = [p for p in swept.folder.rglob("*") if p.is_file()]
    assert kept.relative_to(swept.folder).as_posix() == target.path
    assert kept.read_bytes() in (_payload(2)[:4096], _payload(2), b"DI")

    writer = InstanceWriter(store, Index(db))                     # the sender sends it again
    assert writer.store_instance(target, _payload(2)) is Outcome.STORED
    assert store.read_bytes(target.path) == _payload(2)
