"""The receive path's write side (storage.ingest): group commit, duplicates, healing, and the
durability level taken from the configuration."""
from __future__ import annotations

import os
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


def _no_temporaries(monkeypatch, store):
    def refuse(*_a, **_k):
        raise AssertionError("a new instance went through a temporary file")
    monkeypatch.setattr(store, "write_temp", refuse)


def test_new_instance_is_written_under_its_final_name_and_its_directory_synced(
        parts, monkeypatch):
    _db, index, store = parts
    writer = InstanceWriter(store, index)
    synced = []
    monkeypatch.setattr(store, "sync_dirs", lambda paths: synced.extend(paths))
    _no_temporaries(monkeypatch, store)
    rec = _record(1)
    assert writer.store_instance(rec, [b"DI", memoryview(b"CM")]) is Outcome.STORED
    assert store.read_bytes(rec.path) == b"DICM"
    assert synced == [store.path(rec.path)]          # the name made durable before Success
    assert index.instance_path(rec.sop_instance_uid) == rec.path


def test_a_partial_file_a_crash_left_under_the_final_name_is_replaced(parts):
    _db, index, store = parts
    writer = InstanceWriter(store, index)
    rec = _record(1)
    final = store.path(rec.path)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"DI")                          # written, never indexed, then a crash
    assert writer.store_instance(rec, b"DICM") is Outcome.STORED
    assert store.read_bytes(rec.path) == b"DICM"
    assert index.instance_path(rec.sop_instance_uid) == rec.path
    assert not list(store.root.rglob(".tmp-*"))


def test_duplicate_under_another_series_leaves_no_file_and_the_first_copy(parts):
    _db, index, store = parts
    writer = InstanceWriter(store, index)
    first = _record(1)
    assert writer.store_instance(first, b"DICM") is Outcome.STORED
    # Same SOP Instance UID, other study/series: another path, written directly, then dropped.
    other = InstanceRecord(**{**first.__dict__, "study_instance_uid": "1.2.9",
                              "series_instance_uid": "1.2.9.1",
                              "path": "instances/1.2.9/1.2.9.1/1.2.3.1.1.dcm"})
    assert writer.store_instance(other, b"XXXX") is Outcome.DUPLICATE
    assert not store.path(other.path).exists()
    assert store.read_bytes(first.path) == b"DICM"
    assert index.instance_path(first.sop_instance_uid) == first.path


def test_failed_commit_removes_the_directly_written_file(parts, monkeypatch):
    _db, index, store = parts
    writer = InstanceWriter(store, index)

    def broken(*_a, **_k):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index, "add_instances", broken)
    rec = _record(1)
    with pytest.raises(RuntimeError):
        writer.store_instance(rec, b"DICM")
    assert not store.path(rec.path).exists()


def test_same_instance_from_concurrent_senders_is_stored_once_and_intact(parts):
    _db, index, store = parts
    writer = InstanceWriter(store, index)

    def send(rec, outcomes, barrier):
        barrier.wait()
        outcomes.append(writer.store_instance(rec, b"DICM"))

    for round_ in range(20):
        rec = _record(round_)
        outcomes, barrier = [], threading.Barrier(4)
        # each round's objects passed in: a sender still running after join(30) keeps its own
        threads = [threading.Thread(target=send, args=(rec, outcomes, barrier)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert Outcome.STORED in outcomes and len(outcomes) == 4
        assert store.read_bytes(rec.path) == b"DICM"          # never removed by a loser
        assert index.instance_path(rec.sop_instance_uid) == rec.path
    assert not list(store.root.rglob(".tmp-*"))


def test_group_commit_lets_waiting_members_prepare_and_not_the_leader():
    started, release = threading.Event(), threading.Event()
    prepared: list[int] = []

    def commit(items):
        if 0 in items:
            started.set()
            release.wait(10)   # the first group is slow: the others wait for it
        return list(items)

    group = GroupCommit(commit)
    leader = threading.Thread(target=lambda: group.submit(0, prepare=lambda: prepared.append(0)))
    leader.start()
    assert started.wait(10)
    followers = [threading.Thread(target=group.submit,
                                  args=(i,), kwargs={"prepare": lambda i=i: prepared.append(i)})
                 for i in (1, 2)]
    for t in followers:
        t.start()
    deadline = time.monotonic() + 10
    while len(prepared) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(prepared) == [1, 2]        # while the group before theirs still runs
    release.set()
    for t in [leader, *followers]:
        t.join(10)
    assert 0 not in prepared                 # a leader's share is done by the commit itself


def test_pending_sync_runs_once_for_every_caller_and_keeps_its_error(tmp_path, monkeypatch):
    import storage.files as files

    calls = []
    monkeypatch.setattr(files, "_fdatasync", lambda fd: calls.append(fd))
    fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT)
    pending = files.PendingSync(fd)
    threads = [threading.Thread(target=pending.sync) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    pending.sync()
    pending.close()
    assert calls == [fd] and pending.synced

    def eio(_fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "_fdatasync", eio)
    bad = files.PendingSync(os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT))
    for _ in range(2):                       # the second caller hears the same error
        with pytest.raises(OSError, match="Input/output"):
            bad.sync()
    closed = files.PendingSync(os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT))
    closed.close()
    with pytest.raises(OSError, match="closed before"):
        closed.sync()                        # never reported as durable


@pytest.mark.parametrize("direct", [False, True])
def test_data_is_synced_after_the_insert_and_before_the_commit(parts, monkeypatch, direct):
    """Through the page cache the write-back is started at once; written directly
    (``O_DIRECT``) the data is on the device when the write returns. Either way the data is
    synced inside the leader's transaction, after the insert and the directory."""
    import storage.files as files
    from storage import direct_io

    _db, index, store = parts
    store = BlobStore(store.root, direct_io=direct)
    if direct and not store.direct_io:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    writer = InstanceWriter(store, index)
    rec = _record(1)
    events: list[str] = []
    real_sync, real_start, real_blocks = (files._fdatasync, files.start_writeback,
                                          direct_io.write_blocks)

    def start(fd):
        events.append("write-back started")
        real_start(fd)

    def blocks(fd, view, size):
        events.append("written directly")
        real_blocks(fd, view, size)

    def sync(fd):
        # Inside the leader's transaction the row is already inserted; another connection
        # does not see it yet (not committed).
        conn = index._writer_conn   # the connection of add_instances' open transaction
        mine = conn is not None and conn.exec_driver_sql(
            "SELECT count(*) FROM instances WHERE sop_instance_uid = ?",
            (rec.sop_instance_uid,)).scalar()
        others = index.instance_path(rec.sop_instance_uid)
        events.append(f"data synced, row {'inserted' if mine else 'not inserted'}, "
                      f"{'visible' if others else 'not committed'}")
        real_sync(fd)

    monkeypatch.setattr(files, "start_writeback", start)
    monkeypatch.setattr(direct_io, "write_blocks", blocks)
    monkeypatch.setattr(files, "_fdatasync", sync)
    monkeypatch.setattr(store, "sync_dirs", lambda paths: events.append("directory synced"))
    assert writer.store_instance(rec, b"DICM") is Outcome.STORED
    assert events == ["written directly" if direct else "write-back started",
                      "directory synced", "data synced, row inserted, not committed"]
    assert index.instance_path(rec.sop_instance_uid) == rec.path
    assert store.read_bytes(rec.path) == b"DICM"


def test_a_failed_data_sync_fails_that_instance_alone(parts, monkeypatch):
    import storage.files as files

    _db, index, store = parts
    writer = InstanceWriter(store, index)
    real_sync = files._fdatasync
    bad = _record(3)

    def sync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(bad.sop_instance_uid + ".dcm"):
            raise OSError(5, "Input/output error")
        real_sync(fd)

    monkeypatch.setattr(files, "_fdatasync", sync)
    outcomes, errors, barrier = {}, {}, threading.Barrier(6)

    def send(k):
        barrier.wait()
        try:
            outcomes[k] = writer.store_instance(_record(k), b"DICM")
        except OSError as exc:
            errors[k] = exc

    threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert list(errors) == [3] and len(outcomes) == 5
    assert set(outcomes.values()) == {Outcome.STORED}
    assert index.instance_path(bad.sop_instance_uid) is None
    assert not store.path(bad.path).exists()          # not indexed, not kept
    assert len(index.series_instances("1.2.3.1")) == 5
