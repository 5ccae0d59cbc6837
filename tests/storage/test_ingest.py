"""The receive path's write side (storage.ingest): group commit, duplicates, healing, and the
durability level taken from the configuration."""
from __future__ import annotations

import threading
import time

import pytest

from config import load_settings
from storage.db import Database
from storage.files import BlobStore
from storage.index import Index, InstanceRecord
from storage.ingest import GroupCommit, InstanceWriter, Outcome


def _record(k: int, series: str = "1.2.3.1", study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(study_instance_uid=study, series_instance_uid=series,
                          sop_instance_uid=f"{series}.{k}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                          path=f"instances/{study}/{series}/{series}.{k}.dcm", size_bytes=4,
                          instance_number=k)


@pytest.fixture
def parts(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/index.db")
    db.upgrade()
    yield db, Index(db), BlobStore(tmp_path / "store")
    db.dispose()


def test_group_commit_answers_each_member_and_groups_concurrent_ones():
    calls: list[list[int]] = []

    def commit(items):
        calls.append(list(items))
        time.sleep(0.05)  # a slow sync: others queue up meanwhile
        return [i * 10 for i in items]

    group = GroupCommit(commit)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, group.submit(i)))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: i * 10 for i in range(12)}
    assert sorted(i for call in calls for i in call) == list(range(12))  # each exactly once
    assert len(calls) < 12  # some shared a commit


def test_group_commit_one_bad_member_fails_alone():
    def commit(items):
        if 3 in items:
            raise ValueError("bad item 3")
        return [True for _ in items]

    group = GroupCommit(commit)
    errors, oks = [], []
    barrier = threading.Barrier(6)

    def submit(i):
        barrier.wait()
        try:
            oks.append(group.submit(i))
        except ValueError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["bad item 3"]
    assert len(oks) == 5


def test_writer_stores_once_and_heals_a_missing_file(parts):
    _db, index, store = parts
    writer = InstanceWriter(store, index)
    rec = _record(1)
    assert writer.store_instance(rec, b"DICM") is Outcome.STORED
    assert store.read_bytes(rec.path) == b"DICM"
    assert writer.store_instance(rec, b"XXXX") is Outcome.DUPLICATE
    assert store.read_bytes(rec.path) == b"DICM"  # stored once, never overwritten
    # Indexed but the file is gone (power loss with sqlite_synchronous = NORMAL): the re-sent
    # copy is written again under the indexed path.
    store.path(rec.path).unlink()
    assert writer.store_instance(rec, b"DICM") is Outcome.STORED
    assert store.read_bytes(rec.path) == b"DICM"
    assert [i.sop_instance_uid for i in index.series_instances("1.2.3.1")] == ["1.2.3.1.1"]
    assert not list(store.root.rglob(".tmp-*"))


def test_writer_concurrent_instances_all_indexed(parts):
    _db, index, store = parts
    writer = InstanceWriter(store, index)
    outcomes = []

    def send(k):
        outcomes.append(writer.store_instance(_record(k, series=f"1.2.3.{k % 3 + 1}"), b"DICM"))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count(Outcome.STORED) == 30
    assert sum(len(index.series_instances(f"1.2.3.{s}")) for s in (1, 2, 3)) == 30


def test_durability_level_follows_sqlite_synchronous(parts, tmp_path):
    _db, index, store = parts
    full = load_settings(storage={"root": str(tmp_path)})
    normal = load_settings(storage={"root": str(tmp_path), "sqlite_synchronous": "NORMAL"})
    assert InstanceWriter.from_settings(full, store, index).sync_dirs
    assert not InstanceWriter.from_settings(normal, store, index).sync_dirs
